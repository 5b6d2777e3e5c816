"""What every quantization method provides, and the helpers they share."""

from __future__ import annotations

import re
from pathlib import Path
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import AnybitError
from ..formats import ActSpec, FormatSpec, get_format
from ..formats.base import rows_per_chunk
from ..models import Adapter
from .options import Options


@dataclass
class LayerReport:
    """Per-layer result, shown in progress bars and kept in the checkpoint's metadata."""

    name: str
    spec: FormatSpec
    error: float  # the method's own error measure (relative weight or output error)


@dataclass
class MethodResult:
    layers: list[LayerReport] = field(default_factory=list)
    # what else the method found, kept in the checkpoint's quantization_config (e.g. FlexQ's ranking)
    extra: dict = field(default_factory=dict)


class Method(ABC):
    """A quantization algorithm: consumes formats, replaces the block linears with
    :class:`anybit.nn.QuantLinear` modules."""

    name: str
    needs_calibration: bool = False
    # runs on a model whose blocks are read from disk one at a time (models/lazy.py): the
    # method touches one block at a time, through run_sequential or quantize_layers_data_free
    streams: bool = False
    # the weight format this method produces (a method may choose per layer); an "int"
    # method whose layer also quantizes activations stores the same grid as "bitplane",
    # the layout of the WxAy GEMM
    weight_format: str = "int"
    # whether the method can quantize activations (abits < 16)
    supports_act: bool = False
    # the method's knobs (a frozen dataclass, methods/options.py)
    options_cls: type[Options] = Options

    def options(self, config: QuantConfig) -> Options:
        """``config.options`` as this method's typed options (defaults filled in); unknown
        keys and malformed values raise :class:`anybit.AnybitError`."""
        return self.options_cls.parse(config.options, self.name)

    def uses_calibration(self, config: QuantConfig) -> bool:
        """Whether this run of the method reads the calibration set (some options make a
        calibrated method data-free: PoTPTQ's step 1 alone)."""
        return self.needs_calibration

    def prepare(self, config: QuantConfig) -> QuantConfig:
        """The config with the method's fixed conventions applied (default: unchanged)."""
        return config

    def layer_fields(self, config: QuantConfig, name: str) -> dict | None:
        """wbits/abits/group_size/sym of linear ``name`` after per-layer overrides; None if skipped."""
        if any(re.search(p, name) for p in config.skip):
            return None
        fields = {"wbits": config.wbits, "abits": config.abits, "group_size": config.group_size, "sym": config.sym}
        for pattern, over in config.overrides.items():
            if re.search(pattern, name):
                fields.update(over)
        return fields

    def spec_from_fields(self, config: QuantConfig, fields: dict) -> FormatSpec:
        fmt = self.weight_format
        if fmt == "int" and fields["abits"] < 16:
            fmt = "bitplane"
        bits, levels = fields["wbits"], 0
        if config.bit_balance and fmt in ("int", "bitplane"):
            bits, levels = bits + 1, (1 << bits) + 1
        return FormatSpec(fmt, bits, fields["group_size"], fields["sym"], levels)

    def layer_spec(self, config: QuantConfig, name: str) -> FormatSpec | None:
        """The weight spec for linear ``name``, with per-layer overrides; None if it is skipped."""
        fields = self.layer_fields(config, name)
        return None if fields is None else self.spec_from_fields(config, fields)

    def layer_act(self, config: QuantConfig, name: str) -> ActSpec:
        """How linear ``name`` quantizes its input at run time (bits 16: not at all)."""
        fields = self.layer_fields(config, name) or {"abits": 16}
        return ActSpec(fields["abits"], config.act_group_size, config.act_sym)

    def validate(self, config: QuantConfig) -> None:
        """Raise :class:`anybit.AnybitError` for settings this method cannot honour."""
        self.options(config)
        all_fields = [{"wbits": config.wbits, "abits": config.abits, "group_size": config.group_size, "sym": config.sym}]
        all_fields += [{**all_fields[0], **over} for over in config.overrides.values()]
        for fields in all_fields:
            spec = self.spec_from_fields(config, fields)
            get_format(spec.format).validate(spec)
            act = ActSpec(fields["abits"], config.act_group_size, config.act_sym)
            act.validate()
            if act.enabled and not self.supports_act:
                raise AnybitError(f"method {self.name} quantizes weights only; use --abits 16, or a method "
                                  f"that quantizes activations (rtn, smoothquant, abq, flexq)")
            if act.enabled and act.group_size != -1 and act.group_size != spec.group_size:
                raise AnybitError(f"--act-group-size {act.group_size} must be -1 (per token) or equal to the weight "
                                  f"group size {spec.group_size}, so that the bit-plane GEMM's groups line up")

    def make_linear(self, linear: nn.Module, packed: dict[str, torch.Tensor], spec: FormatSpec,
                    act: ActSpec | None = None) -> "QuantLinear":
        """The :class:`QuantLinear` holding ``packed`` in place of float ``linear``."""
        from ..nn import QuantLinear

        bias = linear.bias.data if linear.bias is not None else None
        return QuantLinear.from_packed(packed, spec, tuple(linear.weight.shape), bias, act=act)

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
    lazy = getattr(model, "anybit_lazy", None)  # streaming (models/lazy.py): read each block now
    it = bar(range(len(blocks)), desc=desc, enabled=progress, unit="block")
    for i in it:
        block = blocks[i]
        if lazy is not None:
            lazy.materialize(block, f"{adapter.blocks}.{i}")
        for lname, linear in adapter.get_linears(block).items():
            full = f"{adapter.blocks}.{i}.{lname}"
            spec = method.layer_spec(config, full)
            if spec is None:
                continue
            q = quantize_layer(linear, spec)
            q.act = method.layer_act(config, full)
            err = relative_error(linear.weight.data, q.dequantize_weight())
            block.set_submodule(lname, q)
            result.layers.append(LayerReport(full, spec, err))
            it.set_postfix(layer=lname.split(".")[-1], err=f"{err:.2e}", refresh=False)
        if lazy is not None:
            lazy.block_done(f"{adapter.blocks}.{i}", block)
    return result


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖W - Ŵ‖² / ‖W‖² (0 for an all-zero weight); in blocks of rows, so that a large
    layer's temporaries stay small."""
    num = den = 0.0
    step = rows_per_chunk(w.shape[-1])
    for r0 in range(0, w.shape[0], step):
        a = w[r0: r0 + step].float()
        den += a.pow(2).sum().item()
        num += (a - w_hat[r0: r0 + step].float()).pow(2).sum().item()
    return num / den if den > 0 else 0.0
