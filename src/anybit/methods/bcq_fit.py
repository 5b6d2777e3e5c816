"""BCQ fitted directly from the float weight, data-free (LUT-GEMM's baseline; SPEC §2):
greedy, or greedy followed by alternating least squares (``options["fit"]``)."""

from __future__ import annotations

from ..config import QuantConfig
from ..errors import AnybitError
from ..models import Adapter
from ..nn import QuantLinear
from ..progress import bar
from .base import LayerReport, Method, MethodResult, relative_error


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
        result = MethodResult()
        blocks = adapter.get_blocks(model)
        it = bar(range(len(blocks)), desc=f"bcq-{fit}", enabled=progress, unit="block")
        for i in it:
            block = blocks[i]
            for lname, linear in adapter.get_linears(block).items():
                full = f"{adapter.blocks}.{i}.{lname}"
                spec = self.layer_spec(config, full)
                if spec is None:
                    continue
                q = QuantLinear.from_linear(linear, spec, fit=fit)
                err = relative_error(linear.weight.data, q.dequantize_weight())
                block.set_submodule(lname, q)
                result.layers.append(LayerReport(full, spec, err))
                it.set_postfix(layer=lname.split(".")[-1], err=f"{err:.2e}", refresh=False)
        return result
