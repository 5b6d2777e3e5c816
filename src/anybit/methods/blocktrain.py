"""What the block-trained methods (PoTPTQ step 2, ABQ-LLM) share: the training precision,
the epoch order, and per-block statistics.

**Precision.** The official ABQ-LLM (and OmniQuant) code trains under CUDA AMP
(``torch.cuda.amp.autocast``: matmuls in float16, losses in float32). The CPU analogue is
``torch.autocast("cpu", torch.bfloat16)``: the linears run as bfloat16 GEMMs with float32
accumulation (2.4x the float32 GEMM rate on AVX512-BF16 CPUs, docs/training.md), norms,
softmax and losses stay in float32. Only the training steps use it; the block outputs
that feed the next block and every reported error are computed in float32.
``amp=false`` trains in float32. Unset (the default), ``amp`` is on only where the CPU has
bfloat16 matmul instructions (AVX512-BF16 or AMX): elsewhere bfloat16 GEMMs are emulated and
run 7-14x *slower* than float32 (measured on an AVX2-only AMD EPYC, docs/training.md).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from ..allocator import keep_freed_memory  # noqa: F401  (used by potptq, abq)
from .sequential import block_generator


def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_amp(amp: bool | None) -> bool:
    """The ``amp`` option as run: the user's value, or (unset) bfloat16 where it is fast."""
    return fast_bf16() if amp is None else bool(amp)


def train_autocast(enabled: bool):
    """The mixed-precision context of a training step (see the module docstring)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def output_of(y) -> torch.Tensor:
    """A decoder block's hidden states (blocks return a tensor or a tuple)."""
    return y[0] if isinstance(y, tuple) else y


def epoch_order(n: int, seed: int, block: int, epoch: int) -> torch.Tensor:
    """The window order of one epoch: shuffled (the official ABQ-LLM code walks the windows in
    order), from a fixed stream per (seed, block, epoch) so that a resumed run draws what an
    uninterrupted one draws."""
    return torch.randperm(n, generator=block_generator(seed, block, epoch))


def freeze_except(block: nn.Module, params: list[torch.Tensor]) -> None:
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def summary(t: torch.Tensor) -> dict[str, float]:
    """min / mean / max of a tensor, as plain floats for config.json."""
    t = t.detach().float()
    return {"min": _r(t.min()), "mean": _r(t.mean()), "max": _r(t.max())}


def _r(x) -> float:
    v = float(x)
    return v if not math.isfinite(v) else float(f"{v:.6g}")
