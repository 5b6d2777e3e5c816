import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anybit import kernels
from anybit.formats import FormatSpec
from anybit.kernels import native
from anybit.nn import QuantLinear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 172), (33, 65), (1, 1)])
def test_forward_matches_dequantized_linear(bias, shape, monkeypatch):
    # float activations (the int8-activation kernel's rounding is tested in tests/kernels)
    monkeypatch.setattr(native, "INT_ACT8", False)
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=bias)
    spec = FormatSpec("int", 3, 32, False)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 5, shape[1])
    expected = F.linear(x, q.dequantize_weight(), lin.bias)
    with kernels.use("reference"):
        assert torch.allclose(q(x), expected, atol=1e-6)
    assert torch.allclose(q(x), expected, atol=1e-5)  # auto backend
    assert set(q.state_dict()) == {"qweight", "scales", "qzeros"} | ({"bias"} if bias else set())


def test_from_packed_checks_shapes():
    spec = FormatSpec("int", 4, 16, True)
    lin = nn.Linear(32, 8, bias=False)
    packed = QuantLinear.from_linear(lin, spec).packed()
    with pytest.raises(ValueError):
        QuantLinear.from_packed(packed, spec, (8, 48))


def test_unknown_backend_is_a_clear_error():
    from anybit.errors import AnybitError

    with pytest.raises(AnybitError, match="unknown kernel backend"):
        with kernels.use("nope"):
            pass


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_dequant_cache_follows_packed_changes(backend):
    """Both backends cache what they derive from the packed tensors (one key,
    QuantLinear.packed_key): an in-place change and a ``.data`` reassignment both show."""
    if backend == "native" and not kernels.native.available():
        pytest.skip("native kernels not built")
    torch.manual_seed(0)
    spec = FormatSpec("int", 4, 16, False)
    q = QuantLinear.from_linear(nn.Linear(32, 8, bias=False), spec)
    x = torch.randn(3, 32)
    with kernels.use(backend):
        y1 = q(x)
        q.scales.mul_(2)  # in place: the cache must notice
        y2 = q(x)
        q.scales.data = q.scales.data * 2  # new storage, same buffer object
        y3 = q(x)
    assert torch.allclose(y2, 2 * y1, atol=1e-5)
    assert torch.allclose(y2, F.linear(x, q.dequantize_weight() / 2), atol=1e-5)
    assert torch.allclose(y3, 4 * y1, atol=1e-5)
