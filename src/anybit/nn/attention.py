"""Attention with quantized Q, K, V (ABQ-LLM quantizes the inputs of both attention
matmuls at ``abits``, per head and token, dynamic asymmetric; the softmax output stays in
float) and capture of head-averaged attention maps (ABQ-LLM's KL loss).

It plugs into Hugging Face models through their attention interface: the function
registered as ``"anybit"`` reads two attributes of each attention module,
``anybit_qkv`` (an :class:`ActSpec`, or absent: float Q/K/V) and ``anybit_maps`` (a list
that receives ``[batch, q_len, k_len]`` head-averaged probabilities, or absent). Without
either it is plain SDPA, so enabling it changes nothing else. Q and K are quantized after
the rotary embedding, as in OmniQuant/ABQ-LLM's ``qkt_matmul``; keys and values are
quantized per token, so a KV cache gives the same result as a full pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import ActSpec
from ..formats.activation import fake_quantize

NAME = "anybit"
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def _eager(module: nn.Module, query, key, value, attention_mask, scaling: float):
    """Attention with explicit probabilities (for the map capture)."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):
    spec: ActSpec | None = getattr(module, "anybit_qkv", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if spec is not None and spec.enabled:
        ste = torch.is_grad_enabled()
        query, key, value = (fake_quantize(t, spec, ste=ste) for t in (query, key, value))
    maps = getattr(module, "anybit_maps", None)
    if maps is not None:
        out, probs = _eager(module, query, key, value, attention_mask, scaling)
        maps.append(probs.mean(1))
        return out, probs
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """The attention modules of a decoder block (those that own a q_proj)."""
    return [m for m in block.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]


def enable(model: nn.Module) -> None:
    """Route the model's attention through :func:`attention_forward` (a no-op until
    ``anybit_qkv`` or ``anybit_maps`` is set on an attention module)."""
    _register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)


def set_qkv(model: nn.Module, spec: ActSpec | None) -> None:
    """Quantize Q, K, V of every attention module of ``model`` with ``spec`` (None: float)."""
    enable(model)
    for m in attention_modules(model):
        if spec is None or not spec.enabled:
            if hasattr(m, "anybit_qkv"):
                del m.anybit_qkv
        else:
            m.anybit_qkv = spec
