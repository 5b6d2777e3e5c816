"""BCQ fitted directly from the float weight, data-free (LUT-GEMM's baseline; SPEC §2):
greedy, or greedy followed by alternating least squares (``options["fit"]``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QuantConfig
from ..models import Adapter
from ..nn import QuantLinear
from .base import Method, MethodResult, quantize_layers_data_free
from .options import Options, opt


@dataclass(frozen=True)
class BCQOptions(Options):
    fit: str = opt("alternating", "binary-coding fit from the float weight: greedy, or greedy then alternating "
                   "least squares", choices=("greedy", "alternating"), flag="--bcq-fit")


class BCQFit(Method):
    name = "bcq"
    weight_format = "bcq"
    options_cls = BCQOptions
    streams = True  # one block at a time (models/lazy.py)

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration=None, progress=True, run_dir=None,
            run_key="") -> MethodResult:
        fit = self.options(config).fit
        return quantize_layers_data_free(self, model, adapter, config,
                                         lambda linear, spec: QuantLinear.from_linear(linear, spec, fit=fit),
                                         f"bcq-{fit}", progress)
