"""A model's tensors as written to disk and rebuilt after loading onto the meta device."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AnybitError


def state_for_disk(model: nn.Module, skip_meta: bool = False) -> dict[str, torch.Tensor]:
    """``model``'s state dict, contiguous and detached, with tied tensors (shared storage,
    same shape) kept once: the ties are restored at load. ``skip_meta``: leave out tensors
    on the meta device (blocks already written by a streaming save)."""
    state = model.state_dict()
    if skip_meta:
        state = {k: v for k, v in state.items() if not v.is_meta}
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen and v.shape == state[seen[ptr]].shape:
            continue
        if ptr is not None:
            seen[ptr] = k
        out[k] = v.detach().contiguous()
    return out


def rebuild_meta_buffers(model: nn.Module, config) -> None:
    """Buffers computed at construction and not saved (rotary frequencies) are rebuilt off
    the meta device."""
    for mname, mod in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            parent_name, _, child = mname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("cpu"):
                try:
                    fresh = type(mod)(config=config)
                except TypeError:
                    raise AnybitError(f"cannot rebuild {mname} ({type(mod).__name__}) off the meta device") from None
            setattr(parent, child, fresh)
