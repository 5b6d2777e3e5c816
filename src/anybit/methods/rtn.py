"""Round-to-nearest (RTN), with an optional clipping search (SPEC §3).

Per group: min/max (asymmetric) or absmax (symmetric) range; with ``clip_search`` the
range is shrunk by the ratio in ``1, 1-1/grid, …, 1-max_shrink`` that minimises the
group's squared weight error (GPTQ's ``mse`` option, with the norm 2 of SPEC §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..formats import FormatSpec
from ..formats.base import grouped
from ..formats import int as intfmt
from ..models import Adapter
from ..nn import QuantLinear
from .base import Method, MethodResult, quantize_layers_data_free
from .options import Options, opt

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


SYM_RULE_HELP = ("symmetric grid: absmax (absmax/(2^(b-1)-1), codes -(2^(b-1)-1)..2^(b-1)-1), range "
                 "(GPTQ's 2*absmax/(2^b-1) around zero 2^(b-1)) or signed (ggml's Q4_0: the signed extreme "
                 "maps to -2^(b-1))")


@dataclass(frozen=True)
class RTNOptions(Options):
    clip_search: bool = opt(False, "search a range shrink per group (least squared weight error)",
                            flag="--clip-search")
    clip_grid: int = opt(DEFAULT_GRID, "clip_search steps: shrinks 1, 1-1/grid, ... down to 0.8",
                         check=lambda v: v >= 1, must=">= 1")
    sym_rule: str = opt("absmax", SYM_RULE_HELP, choices=intfmt.SYM_RULES)


class RTN(Method):
    name = "rtn"
    supports_act = True  # weights RTN, activations dynamic per token (the W+A baseline)
    options_cls = RTNOptions
    streams = True  # one block at a time (models/lazy.py)

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration=None, progress=True, run_dir=None,
            run_key="") -> MethodResult:
        o = self.options(config)
        clip, grid, sym_rule = o.clip_search, o.clip_grid, o.sym_rule

        def quantize_layer(linear, spec):
            w = linear.weight.data.float()
            shrink = search_shrink(w, spec, grid) if clip else 1.0
            if spec.format == "int" and sym_rule != "absmax":
                return QuantLinear.from_linear(linear, spec, shrink=shrink, sym_rule=sym_rule)
            return QuantLinear.from_linear(linear, spec, shrink=shrink)

        return quantize_layers_data_free(self, model, adapter, config, quantize_layer, "rtn", progress)
