"""The reference backend: dequantize to float, then ``F.linear``. Always available; the
oracle every fast kernel is checked against.

The dequantized weight is cached on the module (keyed on the packed tensors' identity
and version counters, so any change to them invalidates it): evaluation over many
windows then dequantizes once, at the memory cost of a float copy of the weight.
``ANYBIT_DEQUANT_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..formats import activation


def dequantized(module) -> torch.Tensor:
    """The module's float32 weight, from the cache when its packed tensors are unchanged."""
    if os.environ.get("ANYBIT_DEQUANT_CACHE", "1") == "0":
        return module.dequantize_weight()
    key = module.packed_key()
    cached = getattr(module, "_dequant_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = module.dequantize_weight()
    module._dequant_cache = (key, w)
    return w


def linear(x: torch.Tensor, module) -> torch.Tensor:
    """Dynamic activation quantize-dequantize (if the layer quantizes its input), then the
    dequantized weight."""
    x = activation.fake_quantize(x, module.act)
    w = dequantized(module).to(x.dtype)
    return F.linear(x, w, module.bias)
