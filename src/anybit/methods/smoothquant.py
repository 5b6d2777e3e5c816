"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then
quantize weights per channel (or group) and activations per token, both round to nearest.

Per block, on the calibration inputs (the outputs of the already-quantized blocks):
  1. max|X_j| per input channel of the linears after each norm (q/k/v, gate/up; and, with
     ``linear_pairs``, after v_proj and up_proj);
  2. ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (Eq. 4, α = 0.5 by default), folded into the norm
     (or producer linear) and the consumer weights (Eq. 3) — no run-time cost;
  3. RTN weights on the scheme's grid; activations quantized dynamically at run time.
The official code smooths the norm pairs only; ``linear_pairs`` is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QuantConfig
from ..models import Adapter
from ..nn import QuantLinear
from .base import LayerReport, Method, MethodResult, relative_error
from .sequential import run_sequential
from .options import Options, opt
from .smoothing import absmax, fold, input_range, pairs, smooth_scales, weight_absmax


@dataclass(frozen=True)
class SmoothQuantOptions(Options):
    alpha: float = opt(0.5, "migration strength: s = max|X|^alpha / max|W|^(1-alpha)",
                       check=lambda v: 0 <= v <= 1, must="in [0, 1]", flag="--alpha")
    linear_pairs: bool = opt(False, "also smooth v_proj -> o_proj and up_proj -> down_proj (not only norm -> linears)")


class SmoothQuant(Method):
    name = "smoothquant"
    needs_calibration = True
    streams = True  # one block at a time (models/lazy.py)
    supports_act = True
    options_cls = SmoothQuantOptions

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration, progress=True, run_dir=None,
            run_key: str = "") -> MethodResult:
        o = self.options(config)
        alpha, linear_pairs = o.alpha, o.linear_pairs

        def process(i, block, inputs, forward) -> list[LayerReport]:
            ps = pairs(adapter, block, linear_pairs)
            stats = input_range(block, [p.consumers[0] for p in ps], forward)
            for p in ps:
                fold(block, p, smooth_scales(p.reduce(absmax(stats[p.consumers[0]])), weight_absmax(block, p), alpha))
            reports = []
            for name, lin in adapter.get_linears(block).items():
                full = f"{adapter.blocks}.{i}.{name}"
                spec = self.layer_spec(config, full)
                if spec is None:
                    continue
                q = QuantLinear.from_linear(lin, spec, act=self.layer_act(config, full))
                reports.append(LayerReport(full, spec, relative_error(lin.weight.data, q.dequantize_weight())))
                block.set_submodule(name, q)
            return reports

        return run_sequential(model, adapter, calibration, process, run_dir, run_key, desc=f"smoothquant-a{alpha}",
                              progress=progress)
