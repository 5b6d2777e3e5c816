"""Models whose weights stay on disk until a block is quantized (streaming quantization).

``load_lazy(folder)`` builds the model on the meta device and loads only the embeddings,
the final norm and the head; each decoder block's tensors are read from the safetensors
shards (``safe_open``, so a shard is mapped, not read whole) when the method reaches it,
and its float linears are dropped once they are replaced by packed ones. With a ``sink``
(a streaming save, :class:`anybit.io.checkpoint.ShardedSave`), a finished block is written
to its shard and leaves memory too (:meth:`LazyWeights.block_done`). Peak memory is then
about one float block plus the calibration activations (spilled to disk beyond their
budget) plus the embeddings and head, whatever the depth (measured in docs/streaming.md).
Methods that need the whole model at once (FlexQ's sensitivity passes) do not stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..allocator import release_freed_memory
from ..errors import AnybitError


class LazyWeights:
    """Tensor name -> shard of a Hugging Face folder, read on demand."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder = folder
        self.dtype = dtype
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.where = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise AnybitError(f"{index} is corrupt ({e.__class__.__name__}); the model folder is incomplete") from None
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
                self.where = {k: "model.safetensors" for k in st.keys()}
        else:
            raise AnybitError(f"{folder} has no safetensors weights; --stream reads model.safetensors (or its shards)")
        # where finished blocks go (a streaming save); None keeps them in memory
        self.sink: Callable[[str, nn.Module], None] | None = None

    def fingerprint(self) -> str:
        """Identifies the weights without reading them (resume keys): each shard's name, size,
        modification time and safetensors header."""
        h = hashlib.sha256()
        for shard in sorted(set(self.where.values())):
            f = self.folder / shard
            st = f.stat()
            h.update(f"{shard}:{st.st_size}:{st.st_mtime_ns}:{self.dtype}".encode())
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 26)))
        return h.hexdigest()

    def block_done(self, prefix: str, block: nn.Module) -> None:
        """A finished block: with a sink, written there and then dropped from memory (its
        tensors move to the meta device, its kernel caches are deleted)."""
        if self.sink is None:
            return
        self.sink(prefix, block)
        block.to("meta")
        for m in block.modules():
            for attr in ("_native_cache", "_dequant_cache"):  # kernel layouts built on the packed tensors
                if hasattr(m, attr):
                    delattr(m, attr)
        release_freed_memory()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        shard = self.where.get(name)
        if shard is None:
            raise AnybitError(f"{self.folder}: tensor {name} is not in the checkpoint; the model folder is incomplete")
        try:
            with safe_open(str(self.folder / shard), framework="pt") as st:
                t = st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AnybitError(f"{self.folder / shard} is corrupt ({str(e).splitlines()[0] if str(e) else e}); "
                              "the model folder is incomplete") from None
        return t.to(self.dtype)

    def load_head(self, model: nn.Module, name: str) -> None:
        """Read the output head ``name`` (kept on disk while the blocks were quantized)."""
        self.materialize(model.get_submodule(name), name)

    def materialize(self, module: nn.Module, prefix: str, skip=None) -> None:
        """Replace every meta parameter of ``module`` (named ``prefix.<name>`` on disk) by its
        tensor from the checkpoint, but those ``skip(full_name, param)`` keeps; a shape that
        disagrees with the config, or NaN weights, are errors."""
        for mname, mod in module.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None or not p.is_meta:
                    continue
                full = ".".join(x for x in (prefix, mname, pname) if x)
                if skip is not None and skip(full, p):
                    continue
                t = self.get(full)
                if tuple(t.shape) != tuple(p.shape):
                    raise AnybitError(f"{full} has shape {tuple(t.shape)} in the checkpoint but {tuple(p.shape)} in "
                                      "config.json; the model folder is corrupt")
                if not torch.isfinite(t).all():
                    raise AnybitError(f"{full} has NaN or infinite weights; fix the model before quantizing")
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)


def load_lazy(path: str | Path, dtype: torch.dtype = torch.float32):
    """A :class:`~anybit.models.loader.LoadedModel` whose decoder blocks load on demand
    (``model.anybit_lazy``: the :class:`LazyWeights`, used by the data-free methods)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import get_adapter
    from .loader import LoadedModel, _check_config, _quiet

    folder = Path(path)
    if not folder.is_dir():
        raise AnybitError(f"--stream needs a Hugging Face model folder; {path} is not one")
    _check_config(folder / "config.json")
    weights = LazyWeights(folder, dtype)
    with _quiet():
        try:
            config = AutoConfig.from_pretrained(folder)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AnybitError(f"cannot load the model in {folder}: {str(e).splitlines()[0] if str(e) else e}") from None
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = f"{adapter.lm_head}.weight"
    # everything outside the blocks now (embeddings, final norm) but an untied head, which is
    # read when the method is done (load_head), so that it is not in memory with a block;
    # a tied head is restored below
    weights.materialize(model, "", skip=lambda full, p: id(p) in block_ids or full == head)
    if tied:
        model.tie_weights()
    from .state import rebuild_meta_buffers

    rebuild_meta_buffers(model, config)  # rotary frequencies, computed at construction
    model.anybit_lazy = weights
    model.eval()
    return LoadedModel(model, tokenizer, str(folder))
