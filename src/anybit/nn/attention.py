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


def _attention_with_maps(query, key, value, attention_mask, scaling: float, chunk: int = 128):
    """Attention that also returns the head-averaged probabilities ``[B, q_len, k_len]``.

    Computed in blocks of ``chunk`` query rows: each block's scores cover only the keys a
    causal mask lets it see, and the query heads that share a key/value head are stacked
    into one matmul (no copies of K and V per query head). Differentiable; under bfloat16
    autocast the two matmuls run in bfloat16 and the softmax in float32.
    """
    b, h, q_len, d = query.shape
    kvh, k_len = key.shape[1], key.shape[2]
    rep = h // kvh
    offset = k_len - q_len  # query i sits at key position i + offset
    qg = query.reshape(b, kvh, rep, q_len, d)
    outs, maps = [], []
    for s in range(0, q_len, chunk):
        e = min(q_len, s + chunk)
        c = e - s
        kend = k_len if attention_mask is not None else min(k_len, e + offset)
        q = qg[:, :, :, s:e].reshape(b, kvh, rep * c, d)
        scores = torch.matmul(q, key[:, :, :kend].transpose(2, 3)).view(b, kvh, rep, c, kend) * scaling
        if attention_mask is None:
            causal = torch.ones(c, kend, dtype=torch.bool, device=scores.device).tril(s + offset)
            scores = scores.masked_fill(~causal, float("-inf"))
        else:
            m = attention_mask[..., s:e, :kend]
            m = m.reshape(m.shape[0], 1, 1, c, kend) if m.dim() == 4 else m
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs.to(value.dtype).view(b, kvh, rep * c, kend), value[:, :, :kend])
        outs.append(out.view(b, h, c, d))
        avg = probs.view(b, h, c, kend).mean(1)
        maps.append(torch.nn.functional.pad(avg, (0, k_len - kend)) if kend < k_len else avg)
    out = torch.cat(outs, 2).transpose(1, 2).contiguous()
    return out, torch.cat(maps, 1)


class _CausalAttention(torch.autograd.Function):
    """Causal attention ``softmax(Q Kᵀ·scale) V`` with a hand-written backward, for training.

    In blocks of ``chunk`` query rows; each block's scores cover only the keys it may see,
    and the query heads that share a key/value head are stacked into one matmul. The
    probabilities are kept (in the dtype of V: bfloat16 under autocast, 38 MB for 9 heads
    at 2048 tokens) instead of recomputed, and the backward is four matmuls and two
    elementwise passes per block: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)),
    dQ = dS K·scale, dK = dSᵀ Q·scale. On this 2-core CPU it is 1.5x faster than SDPA's
    flash backward at 2048 tokens (docs/training.md). With ``maps`` it also returns the
    head-averaged probabilities ``[B, T, T]`` (ABQ-LLM's KL term) and takes their gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, maps: bool, chunk: int):
        # one compute dtype for all matmuls, forward and backward (under autocast Q and K
        # arrive in float32 after the rotary embedding, V in bfloat16)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        b, h, t, d = q.shape
        kvh = k.shape[1]
        rep = h // kvh
        qg = q.reshape(b, kvh, rep, t, d)
        out = torch.empty(b, kvh, rep, t, d, dtype=v.dtype)
        avg = torch.zeros(b, t, t, dtype=torch.float32) if maps else None
        upper = torch.full((chunk, chunk), float("-inf")).triu(1)
        probs = []
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            c = e - s
            qc = qg[:, :, :, s:e].reshape(b, kvh, rep * c, d)
            scores = torch.matmul(qc, k[:, :, :e].transpose(2, 3)).float().view(b, kvh, rep, c, e)
            scores.mul_(scale)
            scores[..., s:e] += upper[:c, :c]
            p = torch.softmax(scores, -1)
            if maps:
                avg[:, s:e, :e] = p.mean((1, 2))
            p = p.to(v.dtype)
            out[:, :, :, s:e] = torch.matmul(p.view(b, kvh, rep * c, e), v[:, :, :e]).view(b, kvh, rep, c, d)
            probs.append(p)
        out = out.view(b, h, t, d)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale, ctx.chunk, ctx.maps = scale, chunk, maps
        ctx.set_materialize_grads(False)
        return (out, avg) if maps else out

    @staticmethod
    def backward(ctx, dout, dmaps=None):
        q, k, v, out, *probs = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        b, h, t, d = q.shape
        kvh = k.shape[1]
        rep = h // kvh
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(v.dtype)
        qg = q.reshape(b, kvh, rep, t, d)
        dog = dout.reshape(b, kvh, rep, t, d)
        # rowsum(P ⊙ dP) = rowsum(dO ⊙ O) when only the output has a gradient
        rows = None if dmaps is not None else (dout.float() * out.float()).sum(-1).reshape(b, kvh, rep, t, 1)
        dq = torch.empty(b, kvh, rep, t, d, dtype=torch.float32)
        dk = torch.zeros(b, kvh, t, d, dtype=torch.float32)
        dv = torch.zeros(b, kvh, t, d, dtype=torch.float32)
        for i, s in enumerate(range(0, t, chunk)):
            e = min(t, s + chunk)
            c = e - s
            p = probs[i]
            do = dog[:, :, :, s:e].reshape(b, kvh, rep * c, d)
            dv[:, :, :e] += torch.matmul(p.view(b, kvh, rep * c, e).transpose(2, 3), do).float()
            dp = torch.matmul(do, v[:, :, :e].transpose(2, 3)).float().view(b, kvh, rep, c, e)
            if dmaps is not None:
                dp += dmaps[:, s:e, :e].float().view(b, 1, 1, c, e) / h
                dp.sub_((dp * p).sum(-1, keepdim=True))
            else:
                dp.sub_(rows[:, :, :, s:e])
            ds = dp.mul_(p).to(q.dtype).view(b, kvh, rep * c, e)
            dq[:, :, :, s:e] = torch.matmul(ds, k[:, :, :e]).float().view(b, kvh, rep, c, d) * scale
            dk[:, :, :e] += torch.matmul(ds.transpose(2, 3), qg[:, :, :, s:e].reshape(b, kvh, rep * c, d)).float() * scale
        qt, kt, vt = ctx.dtypes
        return dq.view(b, h, t, d).to(qt), dk.to(kt), dv.to(vt), None, None, None


TRAIN_CHUNK = 128


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
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if (maps is not None or training) and dropout == 0.0 and query.shape[2] == key.shape[2]:
        if attention_mask is None:  # causal (what sdpa_mask leaves when there is no padding)
            res = _CausalAttention.apply(query, key, value, scaling, maps is not None, TRAIN_CHUNK)
            out, avg = res if maps is not None else (res, None)
            out = out.transpose(1, 2).contiguous()
        else:
            out, avg = _attention_with_maps(query, key, value, attention_mask, scaling)
        if maps is not None:
            maps.append(avg)
        return out, None
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
