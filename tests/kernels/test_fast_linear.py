"""The prepared eager call (native.FastLinear, tried first by kernels.linear): the same outputs
as the full dispatch on every kind it serves, and never used where it is stale or does not apply."""

import copy
import pickle

import pytest
import torch

from anybit import kernels
from anybit.formats import ActSpec, FormatSpec
from anybit.kernels import native
from anybit.nn import QuantLinear

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built (see setup.py)")

CASES = [
    (FormatSpec("int", 4, 128, False), ActSpec()),
    (FormatSpec("int", 3, 64, True), ActSpec()),
    (FormatSpec("int", 8, -1, False), ActSpec()),
    (FormatSpec("potz", 3, 128, False), ActSpec()),
    (FormatSpec("pot", 2, 64, False), ActSpec()),
    (FormatSpec("pot", 4, 128, False), ActSpec()),  # two tables (native.pot_halves)
    (FormatSpec("bcq", 3, 64, False), ActSpec()),
    (FormatSpec("bitplane", 6, 64, True), ActSpec(6, -1, False)),
    (FormatSpec("bitplane", 4, 64, False), ActSpec(8, 64, True)),
]


def module(spec: FormatSpec, act: ActSpec, n: int = 37, k: int = 192) -> QuantLinear:
    torch.manual_seed(n * k)
    return QuantLinear.from_linear(torch.nn.Linear(k, n), spec, act=act)


def full_dispatch(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return kernels.choose(x, q)[1](x, q)


@pytest.mark.parametrize("spec,act", CASES, ids=lambda c: str(c))
def test_same_outputs_as_the_full_dispatch(spec, act, monkeypatch):
    q = module(spec, act)
    real, calls = native._lib.anybit_lin_rows, []
    monkeypatch.setattr(native._lib, "anybit_lin_rows", lambda *a: (calls.append(a[2]), real(*a))[1])
    with kernels.use("native"):
        for shape in [(1, 192), (3, 192), (2, 5, 192), (1, 1, 192)]:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
            first = q(x)
            assert q.__dict__.get("_anybit_fast") is not None, "no prepared call after a call it serves"
            n_calls = len(calls)
            again = q(x)  # through the prepared call
            rows = x.numel() // 192
            # more rows than the layer's kernel takes (bit-plane AND+popcount: 8) go the full way
            served = rows <= native._fast_limit(q.__dict__["_anybit_fast"][1].kind)
            assert calls[n_calls:] == [rows] * served
            assert again.shape == (*shape[:-1], 37)
            assert torch.equal(again, first)
            assert torch.equal(again, full_dispatch(q, x))


def test_batch_one_on_either_thread_count_is_the_same():
    q = module(FormatSpec("int", 4, 64, False), ActSpec(), n=520, k=1024)
    x = torch.randn(1, 1024)
    with kernels.use("native"):
        q(x)
        fast = q.__dict__["_anybit_fast"][1]
        outs = []
        for t in (1, 2):
            fast.st.threads = t
            outs.append(q(x))
    assert torch.equal(outs[0], outs[1])


def test_changed_weights_and_settings_are_not_served_stale(monkeypatch):
    q = module(FormatSpec("int", 4, 64, False), ActSpec())
    x = torch.randn(2, 192)
    with kernels.use("native"):
        before = q(x)
        q(x)
        with torch.no_grad():
            q.scales.mul_(2)  # in place: the packed key's version counter moves
        after = q(x)
        assert torch.allclose(after, 2 * (before - q.bias) + q.bias, rtol=1e-5, atol=1e-5)
        assert torch.equal(after, full_dispatch(q, x))
        monkeypatch.setattr(native, "INT_ACT8", False)  # the float kernel now: no prepared call serves it
        assert torch.equal(q(x), full_dispatch(q, x))
    with kernels.use("reference"):  # another backend preference: the full dispatch, i.e. the reference
        from anybit.kernels import reference

        assert torch.equal(q(x), reference.linear(x, q))


def test_calls_it_does_not_serve_take_the_full_dispatch(monkeypatch):
    q = module(FormatSpec("int", 4, 64, False), ActSpec())
    with kernels.use("native"):
        q(torch.randn(1, 192))
        assert q.__dict__.get("_anybit_fast") is not None
        xb = torch.randn(3, 192, dtype=torch.bfloat16)
        assert q(xb).dtype == torch.bfloat16
        xt = torch.randn(192, 3).t()  # not contiguous
        assert torch.equal(q(xt), full_dispatch(q, xt.contiguous()))
        monkeypatch.setattr(native, "Q8_MAX_ROWS", 2)
        monkeypatch.setattr(native, "MAX_ROWS", 2)
        x = torch.randn(5, 192)  # more rows than the kernel takes: dequantize + BLAS
        assert torch.equal(q(x), native._dequantized_linear(x, q))
        with pytest.raises(RuntimeError):
            q(torch.randn(1, 191))  # the wrong width still fails as before


def test_no_layout_is_built_for_calls_that_never_use_it():
    q = module(FormatSpec("int", 4, 64, False), ActSpec())
    with kernels.use("native"):
        q(torch.randn(native.q8_rows() + 1, 192))  # a prefill-sized call: dequantize + BLAS
    assert q.__dict__.get("_anybit_fast") is None
    assert native._prep_int_q8 not in q._native_cache[1]


def test_copies_and_pickles_get_their_own():
    q = module(FormatSpec("bcq", 3, 64, False), ActSpec())
    x = torch.randn(1, 192)
    with kernels.use("native"):
        y = q(x)
        for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert other.__dict__.get("_anybit_fast") is None
            assert torch.equal(other(x), y)
            with torch.no_grad():
                other.alpha.mul_(0)  # the copy's weights, not the original's
            assert not torch.equal(other(x), y)
        assert torch.equal(q(x), y)
