"""What every quantization method provides, and the helpers they share."""

from __future__ import annotations

import re
from pathlib import Path
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig
from ..formats import FormatSpec, get_format
from ..models import Adapter


@dataclass
class LayerReport:
    """Per-layer result, shown in progress bars and kept in the checkpoint's metadata."""

    name: str
    spec: FormatSpec
    error: float  # the method's own error measure (relative weight or output error)


@dataclass
class MethodResult:
    layers: list[LayerReport] = field(default_factory=list)


class Method(ABC):
    """A quantization algorithm: consumes formats, replaces the block linears with
    :class:`anybit.nn.QuantLinear` modules."""

    name: str
    needs_calibration: bool = False
    # the weight format this method produces (a method may choose per layer)
    weight_format: str = "int"

    def layer_spec(self, config: QuantConfig, name: str) -> FormatSpec | None:
        """The spec for linear ``name``, with per-layer overrides; None if it is skipped."""
        if any(re.search(p, name) for p in config.skip):
            return None
        fields = {"wbits": config.wbits, "group_size": config.group_size, "sym": config.sym}
        for pattern, over in config.overrides.items():
            if re.search(pattern, name):
                fields.update(over)
        return FormatSpec(self.weight_format, fields["wbits"], fields["group_size"], fields["sym"])

    def validate(self, config: QuantConfig) -> None:
        """Raise :class:`anybit.AnybitError` for settings this method cannot honour."""
        get_format(self.weight_format).validate(FormatSpec(self.weight_format, config.wbits, config.group_size, config.sym))
        for over in config.overrides.values():
            spec = FormatSpec(self.weight_format, over.get("wbits", config.wbits),
                              over.get("group_size", config.group_size), over.get("sym", config.sym))
            get_format(self.weight_format).validate(spec)

    @abstractmethod
    def run(self, model: nn.Module, adapter: Adapter, config: QuantConfig,
            calibration: torch.Tensor | None, progress: bool = True, run_dir: Path | None = None,
            run_key: str = "") -> MethodResult:
        """Quantize ``model`` in place. Calibrated methods save progress in ``run_dir``
        after every block and resume from it when its ``run_key`` matches."""


def quantize_layers_data_free(method: Method, model: nn.Module, adapter: Adapter, config: QuantConfig,
                              quantize_layer, desc: str, progress: bool = True) -> MethodResult:
    """Quantize every block linear on its own (no calibration): ``quantize_layer(linear, spec)``
    returns the :class:`QuantLinear`; the per-block progress bar shows the weight error."""
    from ..progress import bar

    result = MethodResult()
    blocks = adapter.get_blocks(model)
    it = bar(range(len(blocks)), desc=desc, enabled=progress, unit="block")
    for i in it:
        block = blocks[i]
        for lname, linear in adapter.get_linears(block).items():
            full = f"{adapter.blocks}.{i}.{lname}"
            spec = method.layer_spec(config, full)
            if spec is None:
                continue
            q = quantize_layer(linear, spec)
            err = relative_error(linear.weight.data, q.dequantize_weight())
            block.set_submodule(lname, q)
            result.layers.append(LayerReport(full, spec, err))
            it.set_postfix(layer=lname.split(".")[-1], err=f"{err:.2e}", refresh=False)
    return result


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖W - Ŵ‖² / ‖W‖² (0 for an all-zero weight)."""
    den = w.float().pow(2).sum().item()
    return (w.float() - w_hat.float()).pow(2).sum().item() / den if den > 0 else 0.0
