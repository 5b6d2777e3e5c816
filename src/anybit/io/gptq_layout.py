"""Export INT weight-only models in the standard GPTQ checkpoint layout (SPEC §5), the one
AutoGPTQ / GPTQModel / vLLM / transformers read (``checkpoint_format: gptq``, "v1"):

  ``qweight`` int32 ``[K·b/32, N]``   codes packed along K, per output column
  ``qzeros``  int32 ``[G, N·b/32]``   zero points minus one, packed along N
  ``scales``  float16 ``[G, N]``
  ``g_idx``   int32 ``[K]``           group of each input column (k // group_size)

Packing is a little-endian bit stream into 32-bit words: value ``j`` occupies stream bits
``[j·b, (j+1)·b)``, stream bit ``i`` is bit ``i % 32`` of word ``i // 32``. For 2, 4 and 8
bits this is the familiar "32/b values per word"; for 3 bits it is GPTQ's layout where
values 10 and 21 straddle word boundaries. Dequantization: ``w = scale · (q − (qzero+1))``.

``checkpoint_format: gptq_v2`` (GPTQModel's own) stores the zero points as they are
(``w = scale · (q − qzero)``). It is the only way to store an asymmetric grid that GPTQModel
loads from a quantizer other than itself (it refuses ``sym: false`` in v1 unless its own
``meta.quantizer`` wrote it), and it can hold zero point 0, which v1 cannot. ``auto`` writes
v1 for symmetric grids (every GPTQ reader: vLLM, optimum, AutoGPTQ) and v2 for asymmetric.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AnybitError
from ..formats import FormatSpec, get_format
from .checkpoint import WEIGHTS, _read_weights, atomic_dir, commit_dir, read_quant_config


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``values [R, L]`` (L·bits divisible by 32) along L into int32 words ``[R, L·bits/32]``."""
    r, length = values.shape
    if (length * bits) % 32:
        raise ValueError(f"{length} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    bit_idx = torch.arange(bits, dtype=torch.int64)
    stream = ((v.unsqueeze(-1) >> bit_idx) & 1).reshape(r, length * bits // 32, 32)
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)
    # reinterpret the unsigned 32-bit pattern as int32 (two's complement)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


CHECKPOINT_FORMATS = ("auto", "gptq", "gptq_v2")


def _layer_tensors(packed: dict, spec: FormatSpec, shape: tuple[int, int], v2: bool) -> dict[str, torch.Tensor]:
    n, k = shape
    fmt = get_format("int")
    codes, scales, zeros = fmt.unpack(packed, spec, shape)
    g = k if spec.group_size == -1 else spec.group_size
    stored = zeros.to(torch.int64) - (0 if v2 else 1)
    if (stored < 0).any():
        raise AnybitError(
            f"{int((stored < 0).sum())} groups have zero point 0, which the GPTQ v1 layout cannot store "
            "(it keeps zero-1); export with --checkpoint-format gptq_v2 (GPTQModel) or re-quantize with --sym"
        )
    return {
        "qweight": _pack_along_k(codes, spec.bits),
        "qzeros": pack_words(stored.t().contiguous(), spec.bits),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g).to(torch.int32),
    }


def _pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes ``[N, K]`` -> qweight ``[K·b/32, N]`` (each column's codes packed along K)."""
    return pack_words(codes, bits).t().contiguous()


def export_gptq(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                checkpoint_format: str = "auto") -> dict:
    """Write the anybit INT checkpoint ``src`` in the GPTQ layout to ``out`` (atomically);
    returns ``{"out": Path, "checkpoint_format": the one written}``.

    ``checkpoint_format``: ``gptq`` (v1), ``gptq_v2`` or ``auto`` (v1 if symmetric, else v2).
    """
    src, out = Path(src), Path(out)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise AnybitError(f"checkpoint format {checkpoint_format!r} is not one of {', '.join(CHECKPOINT_FORMATS)}")
    if not src.is_dir():
        raise AnybitError(f"{src} does not exist or is not a folder; give a folder written by `anybit quantize`")
    config = read_quant_config(src)
    qc = config["quantization_config"]
    specs = {name: FormatSpec.from_dict(d)
             for name, d in qc["layers"].items()}
    if not specs:
        raise AnybitError(f"{src} has no quantized layers")
    kinds = {(s.format, s.bits, s.group_size, s.sym) for s in specs.values()}
    if len(kinds) != 1 or next(iter(kinds))[0] != "int":
        raise AnybitError("the GPTQ layout needs every layer in one INT format (same bits, group size, sym); "
                          f"{src} has {sorted(kinds)}")
    if any(d.get("abits", 16) != 16 for d in qc["layers"].values()):
        raise AnybitError("the GPTQ layout is for weight-only models; this one quantizes activations")
    spec = next(iter(specs.values()))
    if checkpoint_format == "auto":
        checkpoint_format = "gptq" if spec.sym else "gptq_v2"
    v2 = checkpoint_format == "gptq_v2"
    if spec.bits not in (2, 3, 4, 8):
        raise AnybitError(f"the GPTQ layout supports 2, 3, 4 and 8 bits, not {spec.bits}")
    state = _read_weights(src)
    tensors: dict[str, torch.Tensor] = {}
    quantized_prefixes = set(specs)
    for key, t in state.items():
        prefix = key.rsplit(".", 1)[0]
        if prefix not in quantized_prefixes:
            tensors[key] = t
    for name, s in specs.items():
        d = qc["layers"][name]
        shape = (int(d["out_features"]), int(d["in_features"]))
        if shape[1] % 32 or (shape[0] * s.bits) % 32:
            raise AnybitError(f"layer {name} has shape {shape}; the GPTQ layout needs in_features divisible by 32 "
                              f"and out_features·bits divisible by 32")
        packed = {t: state[f"{name}.{t}"] for t in get_format("int").packed_layout(s, shape)}
        for t, v in _layer_tensors(packed, s, shape, v2).items():
            tensors[f"{name}.{t}"] = v
        if f"{name}.bias" in state:
            tensors[f"{name}.bias"] = state[f"{name}.bias"].to(torch.float16)
    gptq_cfg = {
        "bits": spec.bits, "group_size": spec.group_size, "desc_act": False, "sym": spec.sym,
        "true_sequential": bool(qc.get("options", {}).get("true_sequential", True)),
        "damp_percent": float(qc.get("options", {}).get("damp_percent", 0.01)), "static_groups": False,
        "quant_method": "gptq", "checkpoint_format": checkpoint_format, "model_name_or_path": None,
        "model_file_base_name": "model",
        "meta": {"quantizer": [f"anybit:{qc.get('method')}"]},
    }
    tmp = atomic_dir(out, overwrite)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        hf_config = {k: v for k, v in config.items() if k != "quantization_config"}
        if not hf_config.get("architectures"):  # folders saved before 2026-12-02 carry null (from GGUF)
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
            if arch:
                hf_config["architectures"] = [arch]
        hf_config["quantization_config"] = {k: v for k, v in gptq_cfg.items() if k != "meta"}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(gptq_cfg, indent=2) + "\n")
        for f in src.iterdir():
            if f.is_file() and f.name not in ("config.json", WEIGHTS):
                shutil.copy2(f, tmp / f.name)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "checkpoint_format": checkpoint_format}
