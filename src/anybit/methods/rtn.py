"""Round-to-nearest (RTN), with an optional clipping search (SPEC §3).

Per group: min/max (asymmetric) or absmax (symmetric) range; with ``clip_search`` the
range is shrunk by the ratio in ``1, 1-1/grid, …, 1-max_shrink`` that minimises the
group's squared weight error (GPTQ's ``mse`` option, with the norm 2 of SPEC §3).
"""

from __future__ import annotations

import torch

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import FormatSpec
from ..formats.base import grouped
from ..formats import int as intfmt
from ..models import Adapter
from ..nn import QuantLinear
from .base import Method, MethodResult, quantize_layers_data_free

DEFAULT_GRID = 20
DEFAULT_MAX_SHRINK = 0.2


def search_shrink(w: torch.Tensor, spec: FormatSpec, grid: int = DEFAULT_GRID,
                  max_shrink: float = DEFAULT_MAX_SHRINK) -> torch.Tensor:
    """Per-group shrink ratio ``[N, G]`` of the range that minimises the squared error."""
    wg, mask = grouped(w.float(), spec.group_size)
    best_err = None
    best = None
    for i in range(int(grid * max_shrink) + 1):
        p = 1.0 - i / grid
        wq, _ = grouped(intfmt.fake_quantize(w, spec, p), spec.group_size)
        err = torch.where(mask, (wq - wg) ** 2, 0).sum(-1)
        if best_err is None:
            best_err, best = err, torch.full_like(err, p)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, p, best)
    return best


class RTN(Method):
    name = "rtn"
    supports_act = True  # weights RTN, activations dynamic per token (the W+A baseline)

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration=None, progress=True, run_dir=None,
            run_key="") -> MethodResult:
        clip = bool(config.options.get("clip_search", False))
        grid = int(config.options.get("clip_grid", DEFAULT_GRID))
        # symmetric grids: absmax (default), range (GPTQ's) or signed (ggml's Q4_0 rule)
        sym_rule = str(config.options.get("sym_rule", "absmax"))
        if sym_rule not in intfmt.SYM_RULES:
            raise AnybitError(f"sym_rule must be one of {', '.join(intfmt.SYM_RULES)}, got {sym_rule!r}")

        def quantize_layer(linear, spec):
            w = linear.weight.data.float()
            shrink = search_shrink(w, spec, grid) if clip else 1.0
            if spec.format == "int" and sym_rule != "absmax":
                return QuantLinear.from_linear(linear, spec, shrink=shrink, sym_rule=sym_rule)
            return QuantLinear.from_linear(linear, spec, shrink=shrink)

        return quantize_layers_data_free(self, model, adapter, config, quantize_layer, "rtn", progress)
