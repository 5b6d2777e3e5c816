import pytest
import torch

from anybit.errors import AnybitError
from anybit.formats import ActSpec
from anybit.formats import activation as act


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("group", [-1, 32])
def test_codes_and_fake_quantize_agree_and_are_bounded(sym, bits, group):
    torch.manual_seed(bits)
    x = torch.randn(3, 5, 172) * torch.linspace(0.1, 4, 172)  # ragged last group at g32
    spec = ActSpec(bits, group, sym)
    q, s, z = act.quantize(x, spec)
    lo, hi = act.qrange(spec)
    assert q.min() >= lo and q.max() <= hi
    g = 172 if group == -1 else group
    assert s.shape == (3, 5, -(-172 // g))
    deq = (q.float() - act.expand_groups_tokens(z, g, 172)) * act.expand_groups_tokens(s, g, 172)
    fq = act.fake_quantize(x, spec)
    assert torch.allclose(deq, fq, atol=1e-6)
    # error at most half a step per element
    assert ((fq - x).abs() <= act.expand_groups_tokens(s, g, 172) / 2 + 1e-6).all()


def test_float_spec_is_identity_and_more_bits_less_error():
    x = torch.randn(4, 64)
    assert act.fake_quantize(x, ActSpec()) is x
    errs = [(act.fake_quantize(x, ActSpec(b)) - x).pow(2).mean() for b in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_symmetric_grid_and_zero_token():
    x = torch.tensor([[-31.0, 0.0, 10.0, 31.0], [0.0, 0.0, 0.0, 0.0]])
    q, s, z = act.quantize(x, ActSpec(6, -1, True))  # FlexQ: absmax / 31
    assert torch.equal(q[0], torch.tensor([-31, 0, 10, 31], dtype=torch.int32))
    assert torch.all(z == 0) and torch.isfinite(act.fake_quantize(x, ActSpec(6, -1, True))).all()


def test_ste_passes_gradient():
    x = torch.randn(2, 16, requires_grad=True)
    act.fake_quantize(x, ActSpec(4), ste=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_specs_and_bits_per_activation():
    for spec in (ActSpec(1), ActSpec(9), ActSpec(4, 0)):
        with pytest.raises(AnybitError):
            spec.validate()
    assert ActSpec(8, -1, True).bits_per_activation(576) == pytest.approx(8 + 32 / 576)
    assert ActSpec(6, 128, False).bits_per_activation(576) == pytest.approx(6 + 38 / 128)


def test_per_token_training_quantizer_matches_autograd():
    """The hand-written backward of the per-token STE quantizer equals autograd's on the
    plain expression, including ties at the max and tokens that are all zero."""
    from anybit.formats.activation import _round_ste, act_params, fake_quantize, qrange

    torch.manual_seed(0)
    spec = ActSpec(4, -1, False)
    x = torch.randn(3, 5, 40)
    x[0, 1] = 0.0
    x[1, 2, 3] = x[1, 2, 7] = x[1, 2].max() + 1
    x[2, 0] = x[2, 0].abs() + 0.1  # positive token: min⁻ = 0
    go = torch.randn_like(x)

    def plain(t):
        s, z = act_params(t, spec)
        lo, hi = qrange(spec)
        q = torch.clamp(_round_ste(t / s) + z, lo, hi)  # s, z: [..., 1] per token
        return (q - z) * s

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fake_quantize(a, spec, ste=True), plain(b)
    assert torch.equal(ya, yb)
    (ya * go).sum().backward()
    (yb * go).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
