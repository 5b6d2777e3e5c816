"""The reference backend: dequantize to float, then ``F.linear``. Always available; the
oracle every fast kernel is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, module) -> torch.Tensor:
    w = module.dequantize_weight().to(x.dtype)
    return F.linear(x, w, module.bias)
