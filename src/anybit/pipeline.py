"""The pipeline, top to bottom: model -> calibration data -> method transforms each
decoder block -> packed modules (then save / eval / run elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .config import QuantConfig
from .errors import AnybitError
from .methods import MethodResult, get_method
from .models import get_adapter
from .nn import QuantLinear


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf weights: quantizing them silently gives a broken model."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise AnybitError(f"weight {name} contains NaN or Inf; the source model is broken, re-export it")


def run_key(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None) -> str:
    """Identifies a quantization run (model weights, config, calibration) for resuming."""
    from .methods.sequential import fingerprint

    lazy = getattr(model, "anybit_lazy", None)
    if lazy is not None:  # blocks still on disk: their files identify them
        checksum = [lazy.fingerprint()] + [float(p.detach().double().abs().sum()) for p in model.parameters()
                                          if not p.is_meta]
    else:
        checksum = [float(p.detach().double().abs().sum()) for p in model.parameters()]
    return fingerprint(config.to_dict(), model.config.to_dict(), checksum,
                       calibration if calibration is not None else "none")


def quantize(model: nn.Module, config: QuantConfig, calibration: torch.Tensor | None = None,
             progress: bool = True, run_dir: str | Path | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it.

    ``calibration``: LongTensor ``[nsamples, seqlen]`` of token windows, for methods that
    need data (see :func:`anybit.data.calibration_windows`). ``run_dir``: where calibrated
    methods save progress after each block; a run interrupted there resumes from it.
    """
    method = get_method(config.method)
    config = method.prepare(config)
    config.validate()
    adapter = get_adapter(model)
    method.validate(config)
    if method.uses_calibration(config) and calibration is None:
        raise AnybitError(f"method {method.name} needs calibration data; pass --calib NAME_OR_PATH")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise AnybitError("this model is already quantized; start from the float model")
    if getattr(model, "anybit_lazy", None) is None:
        check_finite(model)
    elif not method.streams:
        raise AnybitError(f"method {method.name} needs the whole model in memory; load it without streaming")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    key = run_key(model, config, calibration) if run_dir is not None else ""
    result: MethodResult = method.run(model, adapter, config, calibration, progress=progress,
                                      run_dir=Path(run_dir) if run_dir is not None else None, run_key=key)
    lazy = getattr(model, "anybit_lazy", None)
    if lazy is not None:  # streamed: the head stayed on disk while the blocks were in memory
        lazy.load_head(model, adapter.lm_head)
    if config.lm_head_bits:
        quantize_lm_head(model, adapter.lm_head, config.lm_head_bits)
    model.anybit_info = quantization_info(model, config, result, time.perf_counter() - t0)
    return model


def quantize_lm_head(model: nn.Module, name: str, bits: int, group_size: int = 128) -> None:
    """RTN the output head (asymmetric INT), untying it from the input embedding, whose
    float weight the token lookup keeps using."""
    from .formats import FormatSpec

    head = model.get_submodule(name)
    linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    w = head.weight.data.detach()
    tied = getattr(model.get_input_embeddings(), "weight", None) is head.weight
    # a copy only when the embedding keeps using the same tensor (a 32000 x 4096 head is 0.5 GB)
    linear.weight.data = w.clone().float() if tied else w.float()
    if head.bias is not None:
        linear.bias.data = head.bias.data.detach().clone()
    model.set_submodule(name, QuantLinear.from_linear(linear, FormatSpec("int", bits, group_size, False)))
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


def quantization_info(model: nn.Module, config: QuantConfig, result: MethodResult, seconds: float) -> dict:
    """The ``quantization_config`` written to ``config.json``."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            layers[name] = {**m.spec.to_dict(), "abits": m.act.bits, "act": m.act.to_dict(),
                           "in_features": m.in_features, "out_features": m.out_features}
    qkv = next((m.anybit_qkv for m in model.modules() if getattr(m, "anybit_qkv", None) is not None), None)
    errors = {r.name: r.error for r in result.layers}
    formats = sorted({v["format"] for v in layers.values()})
    return {
        "quant_method": "anybit",
        "method": config.method,
        "format": formats[0] if len(formats) == 1 else "mixed",
        "bits": config.wbits,
        "group_size": config.group_size,
        "sym": config.sym,
        "abits": config.abits,
        # Q/K/V quantized at run time inside attention (ABQ-LLM), or null
        "qkv": qkv.to_dict() if qkv is not None else None,
        "scheme": config.scheme,
        "seed": config.seed,
        "options": config.options,
        "quantization_seconds": round(seconds, 3),
        "layers": layers,
        "layer_errors": errors,
        **result.extra,
    }
