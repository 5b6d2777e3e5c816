"""The training attention (anybit/nn/attention.py) against SDPA and the autograd
composition, on odd shapes: outputs, head-averaged maps and gradients."""

import pytest
import torch
import torch.nn.functional as F

from anybit.nn.attention import _attention_with_maps, _CausalAttention


def _qkv(b, h, kvh, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g, requires_grad=True) for n in (h, kvh, kvh)]


@pytest.mark.parametrize("b,h,kvh,t,d,chunk", [(1, 9, 3, 300, 64, 128), (2, 4, 2, 37, 16, 8), (1, 2, 2, 129, 8, 64)])
@pytest.mark.parametrize("maps", [False, True])
def test_causal_attention_matches_sdpa_and_autograd(b, h, kvh, t, d, chunk, maps):
    q, k, v = _qkv(b, h, kvh, t, d)
    rep = h // kvh
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    ref_out, ref_maps = _attention_with_maps(q, k, v, None, d ** -0.5, chunk=max(1, chunk // 2))
    assert torch.allclose(ref_out, ref.transpose(1, 2), atol=1e-5)
    res = _CausalAttention.apply(q, k, v, d ** -0.5, maps, chunk)
    out, avg = res if maps else (res, None)
    assert torch.allclose(out, ref, atol=1e-5)
    go = torch.randn_like(out)
    loss = (out * go).sum()
    ref_loss = (ref_out.transpose(1, 2) * go).sum()
    if maps:
        assert torch.allclose(avg, ref_maps, atol=1e-6)
        assert torch.allclose(avg.sum(-1), torch.ones(b, t))
        gm = torch.randn_like(avg)
        loss, ref_loss = loss + (avg * gm).sum(), ref_loss + (ref_maps * gm).sum()
    for a, r in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
        assert torch.allclose(a, r, atol=1e-4), (a - r).abs().max()


def test_bf16_autocast_stays_close_and_returns_input_dtypes():
    q, k, v = _qkv(1, 4, 2, 100, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _CausalAttention.apply(q, k, v, 32 ** -0.5, False, 32)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert (out.float() - ref).abs().max() < 0.05
    gq, gk, gv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert gq.dtype == gk.dtype == gv.dtype == torch.float32
