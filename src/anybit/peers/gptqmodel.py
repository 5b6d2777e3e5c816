"""GPTQModel (and transformers' GPTQ path through optimum) loading anybit's GPTQ-layout
export, for the peer checks of docs/export.md and tests/peers.

GPTQModel is not an anybit extra: its release asks for a newer torch than anybit pins, so it
lives in its own environment (README, "Peer checks"): its dependencies under a constraint
``torch==2.13.0``, then gptqmodel itself with ``--no-deps``, then anybit with ``--no-deps``.
Nothing here imports gptqmodel at module import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

# GPTQModel's CPU kernels for the GPTQ format, and the activation dtypes each accepts
# (measured with gptqmodel 7.7.0; the loader refuses the others with a message)
CPU_BACKENDS = ("gptq_torch", "gptq_torch_fused", "gptq_torch_aten", "gptq_torch_cpu_avx512", "gptq_torch_int8")
DTYPES = ("float16", "bfloat16", "float32")


def unavailable() -> str | None:
    """Why GPTQModel cannot be run here (None if it can)."""
    if importlib.util.find_spec("gptqmodel") is None:
        return ("GPTQModel is not installed in this environment (it needs its own: see README, 'Peer checks'); "
                "skipped")
    return None


def load(path: str | Path, backend: str = "auto", dtype: str = "float16") -> nn.Module:
    """The transformers model GPTQModel builds from the GPTQ folder ``path`` on the CPU."""
    from gptqmodel import BACKEND, GPTQModel

    m = GPTQModel.load(str(path), device="cpu", backend=BACKEND(backend), dtype=getattr(torch, dtype))
    return m.model.eval()


def load_transformers(path: str | Path, dtype: str = "float16") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of the GPTQ folder (transformers -> optimum -> gptqmodel)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), device_map="cpu").eval()


def kernel_names(model: nn.Module) -> list[str]:
    """The quantized-linear classes the peer chose (one kernel per class)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})


def sample_columns(k: int, n: int = 64) -> torch.Tensor:
    """``n`` input columns spread over ``k`` (every group is touched at group sizes >= k/n), the last included."""
    return torch.unique(torch.cat([torch.linspace(0, k - 1, min(n, k)).round().long(), torch.tensor([k - 1])]))


@torch.inference_mode()
def effective_weights(model: nn.Module, columns: int | None = None) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as its kernel applies it, ``[N, K]`` float32 (or
    ``[N, columns]``: the columns :func:`sample_columns` picks).

    Kernel-agnostic: the layer applied to unit vectors (exact in any float dtype) minus its
    bias gives those columns of ``W`` as the kernel computes them, whatever layout it
    repacked the codes into. All K columns cost as much as a K-token forward, which CPU
    float16 kernels run ~50x slower than bfloat16: sample columns there.
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    dtype = model.dtype  # the activation dtype the model was loaded in
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BaseQuantLinear):
            cols = torch.arange(m.in_features) if columns is None else sample_columns(m.in_features, columns)
            unit = torch.zeros(len(cols), m.in_features, dtype=dtype)
            unit[torch.arange(len(cols)), cols] = 1
            y = m(unit).float()
            if getattr(m, "bias", None) is not None:
                y = y - m.bias.float()
            out[name] = y.t().contiguous()
    return out
