"""PoTPTQ's training-time weight in one native pass (kernels_train.inc) equals the PyTorch
expression bit for bit: values and the gradient to Γ, in float32 and bfloat16, on odd
shapes (inputs not a multiple of the group, one group per row, a single row). That it is
the packed format decoded: tests/methods/test_potptq.py (fake_weight takes the native pass
where it is built)."""

import pytest
import torch

from anybit.formats import FormatSpec, pot
from anybit.kernels import native
from anybit.methods import potptq
from anybit.methods.potptq import PoTFakeLinear

pytestmark = pytest.mark.skipif(not native.has_train_kernels(), reason="native kernels not built")

SHAPES = [(12, 172, 32), (1, 77, 64), (33, 200, 128), (7, 96, -1), (5, 64, 64)]


def _fake(n, k, gs, fmt, bits, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data[0, :3] = 0.0  # exact zeros: sign +1 for pot, the zero level for potz
    spec = FormatSpec(fmt, bits, gs)
    s = pot.init_scales(lin.weight.data, spec, grid=(0.5, 1.0, 1.5))
    fake = PoTFakeLinear(lin, s, spec)
    with torch.no_grad():  # a trained Γ: some groups far from 0, one scale at 0 and one negative
        fake.gamma.normal_(0, 0.3)
        fake.gamma[0, 0] = -1.0
        if fake.gamma.numel() > 1:
            fake.gamma.view(-1)[1] = -1.5
    return fake


def _weight_and_grad(fake, dtype, use_native, monkeypatch):
    monkeypatch.setattr(potptq.native, "has_train_kernels", lambda: use_native)
    fake.gamma.grad = None
    w = fake.fake_weight(dtype)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (w.float() * g.float()).sum().backward()
    return w.detach(), fake.gamma.grad.clone()


@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("fmt,bits", [("pot", 3), ("potz", 3), ("potz", 2), ("pot", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fake_weight_equals_pytorch_bit_for_bit(n, k, gs, fmt, bits, dtype, monkeypatch):
    fake = _fake(n, k, gs, fmt, bits)
    w_t, g_t = _weight_and_grad(fake, dtype, False, monkeypatch)
    w_n, g_n = _weight_and_grad(fake, dtype, True, monkeypatch)
    assert w_n.dtype == dtype and w_n.shape == (n, k)
    assert torch.equal(w_n.view(torch.int16) if dtype == torch.bfloat16 else w_n.view(torch.int32),
                       w_t.view(torch.int16) if dtype == torch.bfloat16 else w_t.view(torch.int32))
    assert torch.equal(g_n, g_t)


def test_training_under_autocast_is_identical_with_and_without_the_native_pass(monkeypatch):
    def train(use_native):
        monkeypatch.setattr(potptq.native, "has_train_kernels", lambda: use_native)
        torch.manual_seed(0)
        lin = torch.nn.Linear(200, 24)
        spec = FormatSpec("potz", 3, 64)
        fake = PoTFakeLinear(lin, pot.init_scales(lin.weight.data, spec, grid=(0.5, 1.0, 1.5)), spec)
        opt = torch.optim.Adam([fake.gamma], lr=1e-2)
        x = torch.randn(5, 16, 200, generator=torch.Generator().manual_seed(2))
        y = torch.randn(5, 16, 24, generator=torch.Generator().manual_seed(3))
        for i in range(5):
            with torch.autocast("cpu", torch.bfloat16):
                out = fake(x[i])
            loss = (out.float() - y[i]).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return fake.gamma.detach().clone()

    assert torch.equal(train(True), train(False))
    assert train(True).abs().mean() > 1e-3
