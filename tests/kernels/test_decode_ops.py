"""The native decoding step's small operators (kernels_decode.inc) against PyTorch, on every
instruction set this CPU runs: SiLU·up and one token's attention, whose exponentials use a
polynomial exp (exp_fast) instead of libm's."""

import pytest
import torch
import torch.nn.functional as F

from anybit.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built (see setup.py)")


@pytest.mark.parametrize("n", [1, 7, 64, 333])
def test_silu_mul(isa, n):
    g = torch.randn(2, n, generator=torch.Generator().manual_seed(n)) * 4
    g[0, :6] = torch.tensor([0.0, -100.0, 100.0, -1000.0, 1000.0, -87.5])[: min(6, n)]
    u = torch.randn(2, n, generator=torch.Generator().manual_seed(n + 1))
    gu = torch.cat([g, u], 1).contiguous()
    out = torch.empty(2, n)
    native._lib.anybit_silu_mul(gu.data_ptr(), 2, n, out.data_ptr())
    want = (g.double() * torch.sigmoid(g.double()) * u.double()).float()
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("pos,heads,kv,d", [(0, 3, 1, 8), (5, 4, 2, 16), (130, 9, 3, 64)])
def test_attention_step(isa, pos, heads, kv, d):
    gen = torch.Generator().manual_seed(pos)
    max_t = pos + 3
    q, k, v = (torch.randn(h, d, generator=gen) * 3 for h in (heads, kv, kv))
    kc, vc = torch.randn(kv, max_t, d, generator=gen), torch.randn(kv, max_t, d, generator=gen)
    ang = torch.randn(d, generator=gen)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    half = d // 2

    def rope(x):
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    kr, want_kc, want_vc = rope(k), kc.clone(), vc.clone()
    want_kc[:, pos], want_vc[:, pos] = kr, v
    rep = heads // kv
    keys, values = want_kc[:, : pos + 1].repeat_interleave(rep, 0), want_vc[:, : pos + 1].repeat_interleave(rep, 0)
    want = F.scaled_dot_product_attention(rope(q)[:, None].double(), keys.double(), values.double(), scale=d ** -0.5)
    out, scores = torch.empty(heads, d), torch.empty(max_t)
    native._lib.anybit_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(), max_t, pos,
                                   cos.data_ptr(), sin.data_ptr(), heads, kv, d, d ** -0.5, None, None, 1e-6,
                                   out.data_ptr(), scores.data_ptr())
    torch.testing.assert_close(kc, want_kc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc, want_vc)
    torch.testing.assert_close(out, want[:, 0].float(), rtol=1e-5, atol=1e-5)
