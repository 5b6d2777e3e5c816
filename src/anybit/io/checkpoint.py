"""Quantized checkpoints: a Hugging Face style folder, written atomically.

``config.json`` (the model's config plus ``quantization_config``), ``model.safetensors``
(float parameters and the packed tensors of every :class:`QuantLinear`), tokenizer files
and ``generation_config.json``. Everything is written to a temporary sibling folder that
is renamed into place at the end, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AnybitError
from ..formats import ActSpec, FormatSpec, get_format
from ..models.state import rebuild_meta_buffers as _rebuild_meta_buffers
from ..models.state import state_for_disk as _state_for_disk

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (streaming quantization)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (read in 4 MiB chunks; ~1 GB/s here)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def verify_enabled() -> bool:
    """Loads check the recorded sha256 unless ``ANYBIT_NO_VERIFY=1`` (``--no-verify``)."""
    return os.environ.get("ANYBIT_NO_VERIFY", "0") != "1"


def atomic_dir(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside ``out`` (checked to be writable)."""
    if out.exists() and not overwrite:
        raise AnybitError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise AnybitError(f"output path {out} is a file; choose a folder path for --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(parent, out.name)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise AnybitError(f"cannot write to {parent} ({e.strerror}); choose a writable --out") from None


def _clear_stale(parent: Path, name: str) -> None:
    """Remove temporary folders for ``name`` left by processes that died (a killed run)."""
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name[len(name) + 6:].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue  # not ours
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def commit_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (replacing an old ``out``)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_meta(tmp: Path, model: nn.Module, tokenizer, info: dict, files: list[str]) -> None:
    """config.json (with the sha256 of every tensor file in ``files``), generation config, tokenizer."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if not config.get("architectures"):  # GGUF-converted configs carry null; loaders read it
        config["architectures"] = [type(model).__name__]
    # the hash of every tensor file: a load that finds other bytes refuses them
    config["quantization_config"] = {**info, "sha256": {f: sha256_file(tmp / f) for f in files}}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _save_tensors(state: dict[str, torch.Tensor], f: Path) -> None:
    save_file(state, str(f), metadata={"format": "pt"})  # one key: safetensors writes metadata in hash order


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a quantized model (from :func:`anybit.quantize`) as a Hugging Face style folder."""
    info = getattr(model, "anybit_info", None)
    if info is None:
        raise AnybitError("this model was not quantized by anybit; run anybit.quantize first")
    out = Path(out_dir)
    tmp = atomic_dir(out, overwrite)
    try:
        _save_tensors(_state_for_disk(model), tmp / WEIGHTS)
        _write_meta(tmp, model, tokenizer, info, [WEIGHTS])
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class ShardedSave:
    """A checkpoint written one decoder block at a time (streaming quantization): each
    finished block goes to its own shard and leaves memory; :meth:`finish` writes the rest
    (embeddings, final norm, head) and the index, then renames the folder into place. The
    shards are Hugging Face's ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``; their tensors are exactly those :func:`save` writes."""

    def __init__(self, out_dir: str | os.PathLike, nblocks: int, overwrite: bool = False):
        self.out = Path(out_dir)
        self.tmp = atomic_dir(self.out, overwrite)
        self.total = nblocks + 1
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []

    def _shard(self, state: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(self.files) + 1:05d}-of-{self.total:05d}.safetensors"
        _save_tensors(state, self.tmp / name)
        self.files.append(name)
        self.weight_map.update({k: name for k in state})

    def write_block(self, prefix: str, block: nn.Module) -> None:
        """Write ``block`` (named ``prefix`` in the model) to the next shard; the caller frees it."""
        if len(self.files) >= self.total - 1:
            raise RuntimeError("more blocks written than the checkpoint was opened for")
        self._shard({f"{prefix}.{k}": v for k, v in _state_for_disk(block).items()})

    def finish(self, model: nn.Module, tokenizer) -> Path:
        """Write every tensor not yet written (those still off the meta device), the index,
        config.json (sha256 per shard) and the tokenizer; rename into place."""
        info = getattr(model, "anybit_info", None)
        if info is None:
            raise AnybitError("this model was not quantized by anybit; run anybit.quantize first")
        try:
            rest = {k: v for k, v in _state_for_disk(model, skip_meta=True).items() if k not in self.weight_map}
            while len(self.files) < self.total:  # a model with fewer blocks than announced still names n shards
                self._shard(rest)
                rest = {}
            index = {"metadata": {"total_size": sum((self.tmp / f).stat().st_size for f in self.files)},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            _write_meta(self.tmp, model, tokenizer, info, self.files)
            commit_dir(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_quant_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise AnybitError(f"{path} has no config.json; give a folder written by `anybit quantize`")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, OSError) as e:
        raise AnybitError(f"{cfg_path} is unreadable ({e.__class__.__name__}); re-run anybit quantize") from None
    except json.JSONDecodeError as e:
        raise AnybitError(f"{cfg_path} is corrupt ({e.msg}); re-run anybit quantize") from None
    if not isinstance(config, dict):
        raise AnybitError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object; the checkpoint is corrupt")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "anybit" or not isinstance(qc.get("layers"), dict):
        raise AnybitError(f"{path} is not an anybit quantized model (no anybit quantization_config in config.json)")
    return config


def weight_files(path: Path) -> list[str]:
    """The tensor files of a checkpoint folder: ``model.safetensors``, or the shards its index names."""
    idx = path / INDEX
    if not idx.is_file():
        return [WEIGHTS]
    try:
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AnybitError(f"{idx} is corrupt ({e.__class__.__name__}); re-run anybit quantize") from None
    if not all(isinstance(f, str) and "/" not in f for f in files):
        raise AnybitError(f"{idx} names files outside the folder; the checkpoint is corrupt")
    return files


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors_mmap(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each a private (copy-on-write) memory map of its
    bytes: pages are read from disk when first touched (and may be dropped again under
    memory pressure), so loading costs no copy and a layer never used is never read. One
    map per tensor, so that no two tensors share a storage (savers take shared storage for
    tied weights). Raises ValueError on a malformed file."""
    import numpy as np

    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, t) = _ST_DTYPES[e["dtype"]], [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name}: malformed header entry") from None
        item = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for d in shape:
            numel *= d
        if not (isinstance(s, int) and isinstance(t, int) and 0 <= s <= t <= size - base) or t - s != numel * item:
            raise ValueError(f"tensor {name}: data offsets disagree with its shape or the file size")
        if t == s:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.from_numpy(np.memmap(f, dtype=np.uint8, mode="c", offset=base + s, shape=(t - s,)))
        out[name] = raw.view(dtype).view(shape)
    return out


def _read_weights(path: Path, sha256: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (memory-mapped), each file checked against its sha256."""
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(path):
        f = path / name
        if not f.is_file():
            raise AnybitError(f"{f} is missing; the checkpoint is incomplete, re-run anybit quantize")
        want = (sha256 or {}).get(name)
        if want and verify_enabled() and sha256_file(f) != want:
            raise AnybitError(f"{f} does not match the sha256 recorded when it was saved: the file is corrupt; re-run "
                              "anybit quantize (or pass --no-verify to load it anyway)")
        try:
            part = read_safetensors_mmap(f)
        except (OSError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise AnybitError(f"{f} is corrupt ({msg}); re-run anybit quantize") from None
        if any(k in state for k in part):
            raise AnybitError(f"{f} repeats tensors of another shard; the checkpoint is corrupt")
        state.update(part)
    return state


def install_quant_linears(model: nn.Module, layers: dict, where: str, device=None) -> None:
    """Replace each linear named in ``layers`` (``quantization_config.layers``) by an empty
    :class:`QuantLinear` of its spec, ready for the saved packed tensors."""
    from ..nn import QuantLinear

    for name, spec_d in layers.items():
        try:
            spec = FormatSpec.from_dict(spec_d)
            act = ActSpec.from_layer(spec_d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AnybitError(f"{where}: the quantization_config entry of {name} is invalid ({e.__class__.__name__}: "
                              f"{e}); the checkpoint is corrupt") from None
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise AnybitError(f"{where}: layer {name} in quantization_config is not in the model; the checkpoint is "
                              "corrupt") from None
        get_format(spec.format).validate(spec)
        q = QuantLinear(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                        dtype=linear.weight.dtype, device=device, act=act)
        model.set_submodule(name, q)


def apply_qkv(model: nn.Module, qc: dict) -> None:
    """The Q/K/V activation quantizer recorded in ``quantization_config`` (ABQ-LLM), if any."""
    if isinstance(qc.get("qkv"), dict):
        from ..nn.attention import set_qkv

        set_qkv(model, ActSpec.from_layer({"act": qc["qkv"]}))


def load(path: str | os.PathLike) -> tuple[nn.Module, object]:
    """Load a quantized folder: returns ``(model, tokenizer)`` with packed :class:`QuantLinear` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models import get_adapter
    from ..models.loader import _quiet

    path = Path(path)
    if not path.is_dir():
        raise AnybitError(f"{path} does not exist or is not a folder; give a folder written by `anybit quantize`")
    config = read_quant_config(path)
    qc = config.pop("quantization_config")
    state = _read_weights(path, qc.get("sha256") if isinstance(qc.get("sha256"), dict) else None)
    model_type = config.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except ValueError as e:
        raise AnybitError(f"{path}/config.json: {e}") from None
    # on the meta device: a float model is never built (its linears would be the size of the
    # float checkpoint); every tensor then comes from the file
    with _quiet(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    get_adapter(model)  # unsupported architectures fail here, clearly
    install_quant_linears(model, qc["layers"], str(path))
    expected = model.state_dict()
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in expected if k not in state and not (tied and k.endswith("lm_head.weight"))]
    unexpected = [k for k in state if k not in expected]
    bad = [k for k in state if k in expected and (state[k].shape != expected[k].shape or state[k].dtype != expected[k].dtype)]
    if missing or unexpected or bad:
        what = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "") \
            + (f" wrong shape/dtype {bad[:3]}" if bad else "")
        raise AnybitError(f"{path}: the weights do not match its config ({what.strip()}); the checkpoint is corrupt")
    model.load_state_dict(state, strict=False, assign=True)  # the read tensors become the buffers: no second copy
    if tied:
        model.tie_weights()
    _rebuild_meta_buffers(model, hf_config)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise AnybitError(f"{path}: the weights lack {left[:3]}; the checkpoint is corrupt")
    apply_qkv(model, qc)
    model.anybit_info = qc
    model.eval()
    if not (path / "tokenizer_config.json").is_file():
        return model, None  # saved without a tokenizer
    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise AnybitError(f"cannot load the tokenizer in {path} ({e.__class__.__name__}); the checkpoint is incomplete") from None
    return model, tokenizer


def inspect(path: str | os.PathLike) -> dict:
    """Method, scheme, bits per weight per layer and size on disk, without loading weights."""
    path = Path(path)
    if not path.is_dir():
        raise AnybitError(f"{path} does not exist or is not a folder; give a folder written by `anybit quantize`")
    config = read_quant_config(path)
    qc = config["quantization_config"]
    files = weight_files(path)
    shapes: dict = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise AnybitError(f"{f} is missing; the checkpoint is incomplete, re-run anybit quantize")
        try:
            with safe_open(str(f), framework="pt") as st:
                shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
        except (SafetensorError, OSError) as e:
            raise AnybitError(f"{f} is corrupt ({e}); re-run anybit quantize") from None
    f = path / files[0] if len(files) == 1 else path / INDEX
    layers = {}
    qbits = 0.0
    qweights = 0
    for name, spec_d in qc["layers"].items():
        spec = FormatSpec.from_dict(spec_d)
        fmt = get_format(spec.format)
        n, k = spec_d.get("out_features"), spec_d.get("in_features")
        missing = [t for t in fmt.packed_layout(spec, (n or 1, k or 1)) if f"{name}.{t}" not in shapes]
        if n is None or k is None or missing:
            raise AnybitError(f"{f} lacks the tensors of layer {name}; the checkpoint is corrupt")
        bpw = fmt.bits_per_weight(spec, (n, k))
        act = ActSpec.from_layer(spec_d)
        layers[name] = {"shape": [n, k], "format": spec.format, "bits": spec.bits, "group_size": spec.group_size,
                        "sym": spec.sym, **({"levels": spec.levels} if spec.levels else {}),
                        "abits": act.bits, "act": act.to_dict(),
                        "bits_per_activation": round(act.bits_per_activation(k), 4) if act.enabled else None,
                        "bits_per_weight": round(bpw, 4)}
        qbits += bpw * n * k
        qweights += n * k
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {
        "path": str(path),
        "method": qc.get("method"),
        "scheme": qc.get("scheme"),
        "format": qc.get("format"),
        "quantized_layers": len(layers),
        "quantized_weights": qweights,
        "bits_per_weight": round(qbits / qweights, 4) if qweights else None,
        "size_on_disk_bytes": size,
        "weights_file_bytes": sum((path / n).stat().st_size for n in files),
        "layers": layers,
    }


def _register() -> None:
    # models/loader.py hands anybit folders to this module without importing it
    from ..models.loader import register_folder_loader

    register_folder_loader("anybit", load)


_register()
