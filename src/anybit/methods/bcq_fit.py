"""BCQ fitted directly from the float weight, data-free (LUT-GEMM's baseline; SPEC §2):
greedy, or greedy followed by alternating least squares (``options["fit"]``)."""

from __future__ import annotations

from ..config import QuantConfig
from ..errors import AnybitError
from ..models import Adapter
from ..nn import QuantLinear
from .base import Method, MethodResult, quantize_layers_data_free


class BCQFit(Method):
    name = "bcq"
    weight_format = "bcq"

    def validate(self, config: QuantConfig) -> None:
        if config.options.get("fit", "alternating") not in ("greedy", "alternating"):
            raise AnybitError(f"--bcq-fit must be greedy or alternating, got {config.options.get('fit')!r}")
        super().validate(config)

    def run(self, model, adapter: Adapter, config: QuantConfig, calibration=None, progress=True, run_dir=None,
            run_key="") -> MethodResult:
        fit = config.options.get("fit", "alternating")
        return quantize_layers_data_free(self, model, adapter, config,
                                         lambda linear, spec: QuantLinear.from_linear(linear, spec, fit=fit),
                                         f"bcq-{fit}", progress)
