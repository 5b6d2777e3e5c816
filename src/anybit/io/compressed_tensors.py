"""Export INT weight-only models in the compressed-tensors layout (what llm-compressor writes
and vLLM loads): ``format: pack-quantized``, one config group per distinct grid.

Per quantized linear ``P``:

  ``P.weight_packed``      int32 ``[N, ceil(K·b/32)]``  codes as a dense little-endian bit stream
                           (value j at bits j·b…), stored offset-binary (signed q + 2^(b−1)),
                           which is anybit's unsigned code as it is
  ``P.weight_scale``       float32 ``[N, G]``  (anybit's float16 scales, exactly)
  ``P.weight_zero_point``  int32 ``[ceil(N·b/32), G]``  asymmetric only: zero points packed
                           along N, offset-binary like the codes
  ``P.weight_shape``       int64 ``[2]``

so that compressed-tensors' ``(q − zp)·scale`` is anybit's ``s·(code − z)``. Scales are
written in float32 so that decompression in the scale's dtype is bit-exact. W8A8 (INT8
weights per channel, dynamic per-token INT8 activations, both symmetric) is written as
``int-quantized``: ``P.weight`` int8 ``[N, K]`` and ``P.weight_scale`` ``[N, 1]``. Refused: other
formats, other activation schemes, groups that do not divide K (an output head on such a grid is written as its dequantized
float values and listed in ``ignore``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..errors import AnybitError

VERSION = "0.20.1"  # the compressed-tensors version this layout was checked against


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``values [R, L]`` (< 2^bits) as int32 words ``[R, ceil(L·bits/32)]``: a dense
    little-endian bit stream per row, padded to whole groups of 32 values."""
    from .gptq_layout import pack_words  # the same little-endian stream (GPTQ's layout)

    length = values.shape[1]
    padded = math.ceil(length / 32) * 32
    words = pack_words(torch.nn.functional.pad(values.to(torch.int64), (0, padded - length)), bits)
    return words[:, : math.ceil(length * bits / 32)].contiguous()


def _scheme(spec, k: int) -> dict:
    return {"num_bits": spec.bits, "type": "int", "symmetric": bool(spec.sym),
            "strategy": "channel" if spec.group_size in (-1, k) else "group",
            "group_size": None if spec.group_size in (-1, k) else spec.group_size, "dynamic": False,
            "observer": "minmax", "actorder": None}


def export_compressed_tensors(path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the anybit folder ``path`` in the compressed-tensors pack-quantized layout."""
    from safetensors.torch import save_file

    from ..nn.qlinear import QuantLinear
    from .checkpoint import _state_for_disk, atomic_dir, commit_dir, load, read_quant_config

    src = Path(path)
    config = read_quant_config(src)
    model, _ = load(src)
    groups: dict[str, dict] = {}
    state = {}
    ignore = []
    prefixes = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            ignore.append(name)
            continue
        if not isinstance(mod, QuantLinear):
            continue
        spec, (n, k) = mod.spec, mod.shape
        if mod.act.enabled:  # W8A8: int8 weights per channel, int8 activations per token, both symmetric
            act = mod.act
            if not (spec.format in ("int", "bitplane") and spec.bits == 8 and spec.sym and spec.group_size in (-1, k)
                    and act.bits == 8 and act.sym and act.group_size == -1):
                raise AnybitError(f"{name} is W{spec.bits}A{act.bits} (weights g{spec.group_size}{' sym' if spec.sym else ''}, "
                                  f"activations{' sym' if act.sym else ' asym'} group {act.group_size}); compressed-tensors "
                                  "W8A8 is written for --wbits 8 --abits 8 --group-size -1 --sym --act-sym only")
            codes, scales, _ = mod.fmt.unpack(mod.packed(), spec, mod.shape)
            state[f"{name}.weight"] = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            state[f"{name}.weight_scale"] = scales.float().reshape(n, 1).contiguous()
            if mod.bias is not None:
                state[f"{name}.bias"] = mod.bias.detach().float().contiguous()
            wq = {**_scheme(spec, k), "strategy": "channel", "group_size": None}
            ia = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                  "dynamic": True, "observer": None, "actorder": None}
            key = json.dumps({"w": wq, "a": ia}, sort_keys=True)
            groups.setdefault(key, {"targets": [], "weights": wq, "input_activations": ia,
                                    "format": "int-quantized"})["targets"].append(f"re:^{name}$")
            prefixes.add(name)
            continue
        if spec.format != "int" or (spec.levels and spec.levels != 1 << spec.bits):
            raise AnybitError(f"{name} is {spec.format} W{spec.bits}; compressed-tensors holds INT grids only "
                              "(re-quantize with an INT method: rtn, gptq)")
        if spec.group_size not in (-1, k) and k % spec.group_size and name == "lm_head":
            # a head on a ragged grid: its exact dequantized values, in float, left unquantized
            state["lm_head.weight"] = mod.dequantize_weight().contiguous()
            ignore.append(name)
            prefixes.add(name)
            continue
        if spec.group_size not in (-1, k) and k % spec.group_size:
            raise AnybitError(f"{name}: group {spec.group_size} does not divide its {k} inputs; compressed-tensors "
                              "groups must (re-quantize with a group size dividing K)")
        codes, scales, zeros = mod.fmt.unpack(mod.packed(), spec, mod.shape)
        state[f"{name}.weight_packed"] = pack_stream(codes, spec.bits)
        state[f"{name}.weight_scale"] = scales.float().contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not spec.sym:
            state[f"{name}.weight_zero_point"] = pack_stream(zeros.to(torch.int64).t().contiguous(), spec.bits).t().contiguous()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().float().contiguous()
        key = json.dumps(_scheme(spec, k), sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": _scheme(spec, k), "input_activations": None,
                                "format": "pack-quantized"})["targets"].append(f"re:^{name}$")
        prefixes.add(name)
    if not groups:
        raise AnybitError(f"{src} has no quantized linear layers to export")
    for k_, v in _state_for_disk(model).items():
        if k_.rsplit(".", 1)[0] not in prefixes:
            state[k_] = v.contiguous()
    hf = {k_: v for k_, v in config.items() if k_ != "quantization_config"}
    if not hf.get("architectures"):
        hf["architectures"] = [type(model).__name__]
    formats = {g["format"] for g in groups.values()}
    hf["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {**g, "output_activations": None} for i, g in enumerate(groups.values())},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "version": VERSION}
    out = Path(out)
    tmp = atomic_dir(out, overwrite)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True, default=str) + "\n")
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")) or f.suffix == ".model":
                shutil.copy2(f, tmp / f.name)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "groups": len(groups), "layers": len(prefixes), "ignored": ignore}
