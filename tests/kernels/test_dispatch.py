"""The dispatch asks each backend whether it runs a call (device, input dtype, the module's
activation scheme, group size, rows) before choosing it (kernels/__init__.py)."""

import pytest
import torch

from anybit import kernels
from anybit.formats import ActSpec, FormatSpec
from anybit.kernels import native, reference
from anybit.nn import QuantLinear


def _q(fmt: str, bits: int = 4, group: int = 32, act: ActSpec | None = None) -> QuantLinear:
    lin = torch.nn.Linear(64, 24, bias=False)
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(0))
    return QuantLinear.from_linear(lin, FormatSpec(fmt, bits, group, False), act=act)


@pytest.mark.skipif(not native.available(), reason="native kernels not built (see setup.py)")
def test_native_is_chosen_only_for_calls_it_runs():
    x = torch.randn(2, 64)
    assert kernels.choose(x, _q("int"))[0] == "native"
    assert kernels.choose(x.to(torch.bfloat16), _q("int"))[0] == "native"  # converted to float32 inside
    assert kernels.choose(torch.randn(2, 64, device="meta"), _q("int"))[0] == "reference"
    assert kernels.choose(x.to(torch.int32), _q("int"))[0] == "reference"
    a8 = ActSpec(8, -1, False)
    assert kernels.choose(x, _q("int", act=a8))[0] == "reference"  # INT kernel: float activations only
    assert kernels.choose(x, _q("bitplane", act=a8))[0] == "native"
    assert kernels.choose(x, _q("bitplane"))[0] == "reference"  # AND+popcount needs quantized activations
    rows = torch.randn(native.MAX_ROWS_BITPLANE + 1, 64)
    assert kernels.choose(rows, _q("bitplane", act=a8))[0] == "reference"
    assert kernels.choose(x, _q("bcq", 3, 12))[0] == "reference"  # BCQ kernel: groups of 8
    assert kernels.choose(x, _q("bcq", 3, 16))[0] == "native"
    with kernels.use("reference"):
        assert kernels.choose(x, _q("int"))[0] == "reference"


def test_a_registered_backend_is_asked_first(monkeypatch):
    monkeypatch.setattr(kernels, "_REGISTRY", {k: dict(v) for k, v in kernels._REGISTRY.items()})
    monkeypatch.setattr(kernels, "_PRIORITY", list(kernels._PRIORITY))
    calls = []

    def fake(x, module):
        calls.append(x.shape[0])
        return reference.linear(x, module)

    kernels.register("fake", "pot", fake, priority=0, supports=lambda x, m: x.shape[0] == 1)
    m = _q("pot")
    one, two = torch.randn(1, 64), torch.randn(2, 64)
    assert kernels.choose(one, m) == ("fake", fake)
    assert kernels.choose(two, m)[0] != "fake"  # it says it cannot: the next backend runs it
    torch.testing.assert_close(m(one), reference.linear(one, m))
    m(two)
    assert calls == [1]
