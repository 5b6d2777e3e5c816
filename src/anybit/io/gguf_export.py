"""Export anybit INT models to GGUF, the file llama.cpp (and ollama, LM Studio, …) runs.

A linear layer is written in the ggml type whose grid equals its own, so llama.cpp computes
with exactly the weights anybit quantized (block layouts of ggml-common.h, 32 weights per
block, ``d`` and ``m`` float16):

  ========  ===========================  ====================================
  ggml      anybit grid (group 32)       weight
  ========  ===========================  ====================================
  Q4_0      INT4 symmetric               ``d·(q − 8)``, q 0..15
  Q4_1      INT4 asymmetric              ``d·q + m``  (m = −z·s in float16)
  Q5_0      INT5 symmetric               ``d·(q − 16)``
  Q5_1      INT5 asymmetric              ``d·q + m``
  Q8_0      INT8 symmetric               ``d·q``, q −128..127
  ========  ===========================  ====================================

Symmetric grids are bit-exact. Asymmetric ones are exact but for ``m``: anybit stores
``s`` (float16) and an integer zero point, ggml stores the float16 of ``−z·s``, which can
round (by at most 2⁻¹¹ of |m|; :func:`export_gguf` reports the largest weight change).
Norms and float weights are F32, as anybit computes them; an output head on another grid
is written as its dequantized F32 values (exact). Any other grid is refused with the
nearest exact scheme. llama-architecture Q/K rows are permuted as llama.cpp's converter
does (GGUF keeps Meta's interleaved rotary layout; permuting whole rows is exact).

Architectures: llama and mistral (``llama`` in GGUF). Tokenizer and model metadata are
copied from the source GGUF where the model came from one (SmolLM2), or built from a
SentencePiece ``tokenizer.model`` (stories260K; read with a small protobuf reader, no
sentencepiece dependency).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import AnybitError

BLOCK = 32
# ggml type -> (bits, symmetric)
GGML_TYPES = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
# general.file_type (llama_ftype) of a file whose linears are mostly this type
FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}
ARCHS = {"llama": "llama", "mistral": "llama"}


def ggml_type(spec) -> str | None:
    """The ggml type whose grid is ``spec``'s exactly, or None."""
    if spec.format != "int" or spec.group_size != BLOCK or (spec.levels or (1 << spec.bits)) != 1 << spec.bits:
        return None
    for name, (bits, sym) in GGML_TYPES.items():
        if bits == spec.bits and sym == spec.sym:
            return name
    return None


def refusal(spec, layer: str) -> str:
    """One line: why ``layer`` cannot be written exactly, and the scheme that can."""
    what = f"{spec.format} W{spec.bits} g{spec.group_size}{' sym' if spec.sym else ''}"
    if spec.format == "int" and spec.bits in (4, 5, 8):
        if spec.bits == 8 and not spec.sym:
            fix = "re-quantize with --wbits 8 --group-size 32 --sym (Q8_0)"
        else:
            t = [n for n, (b, s) in GGML_TYPES.items() if b == spec.bits and s == spec.sym][0]
            fix = f"re-quantize with --group-size 32{' --sym' if spec.sym else ''} ({t})"
    else:
        fix = ("re-quantize as INT4/INT5/INT8 with --group-size 32 (Q4_0/Q4_1, Q5_0/Q5_1 with or without --sym; "
               "Q8_0 with --sym)")
    return f"{layer} is {what}, which no ggml type stores exactly; {fix}"


# ------------------------------------------------------------------------------ blocks

def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def pack_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, kind: str) -> tuple[np.ndarray, float]:
    """ggml blocks ``uint8 [N, K/32 · block bytes]`` of unsigned codes ``[N, K]`` with float16-grid
    scales and integer zeros ``[N, K/32]``; also the largest |weight change| (0: bit-exact)."""
    bits, sym = GGML_TYPES[kind]
    n, k = codes.shape
    g = k // BLOCK
    q = codes.to(torch.int32).reshape(n, g, BLOCK)
    s = scales.float().reshape(n, g)
    z = zeros.float().reshape(n, g)
    parts = [_f16_bytes(s)]
    change = 0.0
    if not sym:  # Q4_1 / Q5_1: w = d·q + m
        m = (-z * s).to(torch.float16)
        change = float(((m.float() - (-z * s)).abs()).max()) if m.numel() else 0.0
        parts.append(_f16_bytes(m.float()))
    if kind == "Q8_0":
        parts.append((q - 128).to(torch.int8).numpy().view(np.uint8))
    else:
        lo, hi = q[..., :16], q[..., 16:]
        if bits == 5:  # qh: bit j = 5th bit of weight j (j < 32), little-endian uint32
            high = (q >> 4) & 1
            qh = (high.to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)).sum(-1)
            parts.append(qh.to(torch.int64).numpy().astype("<u4").view(np.uint8).reshape(n, g, 4))
        qs = ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8)
        parts.append(qs.numpy())
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(n, -1)), change


def _permute_rows(n_head: int, rows: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives Q/K weights (HF rotate-half -> interleaved)."""
    hd = rows // n_head
    return torch.arange(rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------- metadata

def _read_spm(path: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece ``tokenizer.model`` (ModelProto field 1)."""
    buf = path.read_bytes()

    def varint(b, i):
        v = shift = 0
        while True:
            c = b[i]
            i += 1
            v |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return v, i

    pieces, scores, types = [], [], []
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            ln, i = varint(buf, i)
            chunk = buf[i:i + ln]
            i += ln
            if field == 1:
                piece, score, typ, j = b"", 0.0, 1, 0
                while j < len(chunk):
                    k2, j = varint(chunk, j)
                    f2, w2 = k2 >> 3, k2 & 7
                    if w2 == 2:
                        l2, j = varint(chunk, j)
                        if f2 == 1:
                            piece = chunk[j:j + l2]
                        j += l2
                    elif w2 == 5:
                        if f2 == 2:
                            score = struct.unpack("<f", chunk[j:j + 4])[0]
                        j += 4
                    elif w2 == 0:
                        v, j = varint(chunk, j)
                        if f2 == 3:
                            typ = v
                    elif w2 == 1:
                        j += 8
                    else:
                        raise ValueError("unexpected protobuf wire type")
                pieces.append(piece)
                scores.append(score)
                types.append(typ)
        elif wire == 0:
            _, i = varint(buf, i)
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError("unexpected protobuf wire type")
    if not pieces:
        raise ValueError("no pieces")
    return pieces, scores, types


def _copy_source_metadata(writer, source: Path) -> None:
    """Every key of the source GGUF but the file type and the tensor-data ones."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "GGUF.version",
            "GGUF.tensor_count", "GGUF.kv_count", "general.alignment"}
    for field in reader.fields.values():
        if field.name in skip or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _model_metadata(writer, cfg, name: str) -> None:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(hd)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_vocab_size(cfg.vocab_size)
    if hd != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(hd)
        writer.add_value_length(hd)


def _spm_metadata(writer, folder: Path, cfg) -> None:
    pieces, scores, types = _read_spm(folder / "tokenizer.model")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, fn in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            fn(v)
    unk = [i for i, t in enumerate(types) if t == 2]
    if unk:
        writer.add_unk_token_id(unk[0])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


# -------------------------------------------------------------------------------- export

def _rope_ok(cfg) -> str | None:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    return None if kind in ("default", None) else f"rope type {kind!r} (only the default rotary embedding is exported)"


def plan(model) -> dict[str, str]:
    """The ggml type of each quantized linear; raises AnybitError (one line) on the first
    layer no ggml type stores exactly (the output head excepted: written as F32)."""
    from ..nn.qlinear import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            if mod.act.enabled:
                raise AnybitError(f"{name} quantizes its activations (W{mod.spec.bits}A{mod.act.bits}); GGUF holds "
                                  "weight-only models (llama.cpp picks its own activation rounding)")
            t = ggml_type(mod.spec)
            if t is None and name != "lm_head":
                raise AnybitError(refusal(mod.spec, name))
            if t is not None and mod.in_features % BLOCK:
                if name == "lm_head":
                    t = None
                else:
                    raise AnybitError(f"{name} has {mod.in_features} inputs, not a multiple of {BLOCK}: ggml blocks "
                                      f"cannot hold it; keep it in float (--skip '{name.split('.')[-1]}')")
            out[name] = t or "F32"
    return out


def export_gguf(path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the anybit folder ``path`` as the GGUF file ``out`` (atomically). Returns a
    summary: tensor types, bytes, largest weight change from float16 rounding of ``m``."""
    import gguf

    from .checkpoint import load, read_quant_config

    src_dir = Path(path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise AnybitError(f"{out} exists; pass --overwrite or choose another --out")
    info = read_quant_config(src_dir).get("quantization_config") or {}
    model, _tok = load(src_dir)
    cfg = model.config
    if cfg.model_type not in ARCHS:
        raise AnybitError(f"GGUF export supports {', '.join(ARCHS)} models; {src_dir} is {cfg.model_type!r}")
    why = _rope_ok(cfg)
    if why:
        raise AnybitError(f"cannot export {src_dir}: {why}")
    types = plan(model)
    source = info.get("source")
    source_gguf = spm_dir = None
    if (src_dir / "tokenizer.model").is_file():
        spm_dir = src_dir
    if source:
        from ..models.loader import resolve_builtin

        try:
            p = Path(source) if Path(source).exists() else Path(resolve_builtin(source))
        except (AnybitError, KeyError):
            p = None
        if p is not None and p.suffix == ".gguf" and p.is_file():
            source_gguf = p
        elif spm_dir is None and p is not None and (p / "tokenizer.model").is_file():
            spm_dir = p
    if source_gguf is None and spm_dir is None:
        raise AnybitError(f"no GGUF tokenizer for {src_dir}: the source is neither a GGUF file nor a folder with a "
                          "SentencePiece tokenizer.model")
    arch = ARCHS[cfg.model_type]
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    if source_gguf is not None:
        _copy_source_metadata(writer, source_gguf)
    else:
        _model_metadata(writer, cfg, src_dir.name)
        _spm_metadata(writer, spm_dir, cfg)
    linear_types = [t for n, t in types.items() if n != "lm_head"]
    main_type = max(set(linear_types), key=linear_types.count) if linear_types else "F32"
    writer.add_file_type(FILE_TYPES[main_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    change = 0.0
    counts: dict[str, int] = {}

    def f32(name: str, t: torch.Tensor) -> None:
        writer.add_tensor(name, np.ascontiguousarray(t.detach().float().numpy()), raw_dtype=gguf.GGMLQuantizationType.F32)
        counts["F32"] = counts.get("F32", 0) + 1

    def linear(name: str, path: str, perm_heads: int | None = None) -> None:
        """The linear at ``path``: in its ggml type (``plan``), else as F32 weights."""
        nonlocal change
        module = model.get_submodule(path)
        kind = types.get(path)
        if kind not in (None, "F32"):  # a QuantLinear on a ggml grid
            codes, scales, zeros = module.fmt.unpack(module.packed(), module.spec, module.shape)
            if perm_heads:
                perm = _permute_rows(perm_heads, codes.shape[0])
                codes, scales, zeros = codes[perm], scales[perm], zeros[perm]
            data, ch = pack_blocks(codes, scales, zeros, kind)
            change = max(change, ch)
            writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            counts[kind] = counts.get(kind, 0) + 1
            return
        w = module.dequantize_weight() if kind == "F32" else module.weight  # F32: a head off the ggml grids
        f32(name, w[_permute_rows(perm_heads, w.shape[0])] if perm_heads else w)

    inner = model.model
    f32("token_embd.weight", inner.embed_tokens.weight)
    for i, layer in enumerate(inner.layers):
        p = f"model.layers.{i}"
        f32(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        linear(f"blk.{i}.attn_q.weight", f"{p}.self_attn.q_proj", n_head)
        linear(f"blk.{i}.attn_k.weight", f"{p}.self_attn.k_proj", n_kv)
        linear(f"blk.{i}.attn_v.weight", f"{p}.self_attn.v_proj")
        linear(f"blk.{i}.attn_output.weight", f"{p}.self_attn.o_proj")
        f32(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        linear(f"blk.{i}.ffn_gate.weight", f"{p}.mlp.gate_proj")
        linear(f"blk.{i}.ffn_up.weight", f"{p}.mlp.up_proj")
        linear(f"blk.{i}.ffn_down.weight", f"{p}.mlp.down_proj")
    f32("output_norm.weight", inner.norm.weight)
    head = model.lm_head
    tied = getattr(head, "weight", None) is not None and head.weight is inner.embed_tokens.weight
    if not tied:
        linear("output.weight", "lm_head")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "tensor_types": counts, "bytes": out.stat().st_size, "max_weight_change": change,
            "metadata_from": str(source_gguf) if source_gguf else "tokenizer.model", "architecture": arch,
            "tied_output": tied}


def tensor_summary(path: str | os.PathLike) -> dict[str, int]:
    """Counts of ggml types in a GGUF file (for docs and tests)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


