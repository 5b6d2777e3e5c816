"""ABQ-LLM's fake-quantizer backward in one native pass (kernels_train.inc: fq_backward,
fq_add_extremes) against the PyTorch backward it replaces, for the clipped weights (per
group and per channel, symmetric, asymmetric, bit balance) and per-token activations
(float32 and bfloat16, odd widths, ties at the max and min, all-zero tokens, clamped codes).
The sums run in another order (double in the kernel), so the two agree to float32 rounding,
not bit for bit. Both sides are checked against autograd in float64 elsewhere
(test_abq.py, tests/formats/test_activation.py)."""

import pytest
import torch

from anybit.formats import ActSpec, FormatSpec
from anybit.formats.activation import fake_quantize
from anybit.kernels import native
from anybit.methods.abq import ABQLinear

pytestmark = pytest.mark.skipif(not native.has_train_kernels(), reason="native kernels not built")


def _close(a, b, rtol=1e-4):
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale) < rtol, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("sym,bits,levels,group,k", [(False, 4, 0, 32, 96), (False, 3, 5, 32, 96),
                                                     (True, 6, 0, 32, 96), (False, 2, 0, -1, 77),
                                                     (False, 4, 0, -1, 576), (True, 4, 0, -1, 200)])
def test_clipped_weight_backward_native_equals_pytorch(sym, bits, levels, group, k, monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 19)
    m = ABQLinear(lin, FormatSpec("bitplane", bits, group, sym, levels), ActSpec(8), lwc=True, dc=False)
    for p in (m.gamma, m.beta):
        if p is not None:
            p.data = torch.randn_like(p) + 1  # σ between ~0.5 and ~0.95: some codes clamped
    w = torch.randn(19, k)
    w[1, 5] = w[1, 7] = w[1].max() + 1  # a tied maximum
    w[2, 3] = w[2, 9] = w[2].min() - 1  # a tied minimum
    w[3] = 0.0  # a zero row: the scale clamps at 1e-5
    go = torch.randn(19, k)
    params = [p for p in (m.gamma, m.beta) if p is not None]

    def grads(use_native):
        monkeypatch.setattr(native, "has_train_kernels", lambda: use_native)
        wl = w.clone().requires_grad_()
        out = m.fake_weight(wl)
        return [out] + list(torch.autograd.grad((out * go).sum(), [wl] + params))

    fast, ref = grads(True), grads(False)
    assert torch.equal(fast[0], ref[0])  # the forward is the same code
    for a, b in zip(fast[1:], ref[1:]):
        _close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,k", [(8, 77), (4, 576), (6, 1536), (2, 33)])
def test_per_token_backward_native_equals_pytorch(dtype, bits, k, monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(3, 7, k) * 3
    x[0, 1] = 0.0  # an all-zero token
    x[1, 2, 3] = x[1, 2, 7] = x[1, 2].max() + 1
    x[2, 0] = x[2, 0].abs() + 0.1  # a positive token: min⁻ = 0
    x = x.to(dtype)
    go = torch.randn(3, 7, k).to(dtype)
    spec = ActSpec(bits, -1, False)

    def grad(use_native):
        monkeypatch.setattr(native, "has_train_kernels", lambda: use_native)
        xl = x.clone().requires_grad_()
        (fake_quantize(xl, spec, ste=True).float() * go.float()).sum().backward()
        return xl.grad

    a, b = grad(True), grad(False)
    assert a.dtype == dtype
    if dtype == torch.float32:
        _close(a, b)
    else:  # both round the same float32 gradient to bfloat16; a last-bit difference may flip
        _close(a.float(), b.float(), rtol=1e-2)
