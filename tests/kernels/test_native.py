"""Every native kernel against the PyTorch reference, on every instruction set this CPU
runs, on odd shapes (K not a multiple of 8/16/64, ragged groups, batch 1 and > 1)."""

import os
import subprocess
import sys

import pytest
import torch

from anybit import kernels
from anybit.formats import ActSpec, FormatSpec
from anybit.kernels import native
from anybit.nn import QuantLinear

from conftest import ROOT

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built (see setup.py)")

ORDER = ["scalar", "avx2", "avx512"]


def isas():
    if not native.available():
        return []
    return ORDER[: ORDER.index(native.cpu_isa()) + 1]


@pytest.fixture(params=ORDER)
def isa(request):
    if request.param not in isas():
        pytest.skip(f"this CPU has no {request.param}")
    prev = native.isa()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(prev)


SHAPES = [(37, 172, 1), (64, 576, 3), (16, 100, 2), (24, 64, 1)]


def check(q: QuantLinear, m: int, k: int, rtol: float = 2e-5):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k))
    with kernels.use("reference"):
        ref = q(x)
    with kernels.use("native"):
        out = q(x)
    scale = ref.abs().max().clamp_min(1e-6)
    assert (out - ref).abs().max() <= rtol * scale * k ** 0.5, ((out - ref).abs().max(), scale)


def linear(n, k, bias=True):
    torch.manual_seed(n + k)
    return torch.nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, 128, -1, 50])
@pytest.mark.parametrize("sym", [False, True])
def test_int(isa, bits, group, sym):
    for n, k, m in SHAPES:
        check(QuantLinear.from_linear(linear(n, k), FormatSpec("int", bits, group, sym)), m, k)


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1, 24])
@pytest.mark.parametrize("table", [True, False])
def test_pot(isa, fmt, bits, group, table, monkeypatch):
    monkeypatch.setattr(native, "POT_TABLE", table)
    for n, k, m in SHAPES:
        # a short scale grid: the kernel, not the scale search, is under test
        q = QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, group), grid=(0.5, 0.8, 1.0))
        if fmt == "potz":
            assert (q.dequantize_weight() == 0).any()  # the zero code is exercised
        check(q, m, k)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1, 8])
@pytest.mark.parametrize("fmt", ["bcq", "bcq16"])
def test_bcq(isa, bits, group, fmt):
    for n, k, m in SHAPES:
        check(QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, group), fit="greedy"), m, k)


@pytest.mark.parametrize("wbits,levels,wsym", [(2, 0, False), (3, 5, False), (4, 0, True), (6, 0, True), (8, 0, False)])
@pytest.mark.parametrize("abits", [2, 6, 8])
@pytest.mark.parametrize("act_group,asym", [(-1, True), (-1, False), ("w", False), ("w", True)])
def test_bitplane(isa, wbits, levels, wsym, abits, act_group, asym):
    for n, k, m in SHAPES:
        for group in (32, -1) if k != 576 else (128,):
            act = ActSpec(abits, group if act_group == "w" else -1, not asym)
            q = QuantLinear.from_linear(linear(n, k), FormatSpec("bitplane", wbits, group, wsym, levels), act=act)
            check(q, m, k, rtol=1e-4)


def test_pot_dequantize_kernel_is_bit_exact_and_int_matches():
    for fmt in ("pot", "potz", "int"):
        q = QuantLinear.from_linear(linear(40, 300), FormatSpec(fmt, 3, 64))
        for name in isas():
            native.set_isa(name)
            w = native.dequantize(q)
            if fmt != "int":
                assert torch.equal(w, q.dequantize_weight())
                assert torch.equal(native.dequantize(q, pot_table=False), w)
            else:
                assert torch.allclose(w, q.dequantize_weight(), rtol=1e-6, atol=1e-7)
            assert isinstance(native.dequantize(q, scratch_only=True), float)


@pytest.mark.parametrize("fmt", ["int", "pot", "bcq"])
def test_large_batches_dequantize_then_blas(fmt):
    """Above MAX_ROWS rows: a dequantized weight and BLAS (no cached float copy for INT/PoT)."""
    q = QuantLinear.from_linear(linear(8, 64), FormatSpec(fmt, 3, 32))
    x = torch.randn(native.MAX_ROWS + 1, 64)
    with kernels.use("reference"):
        ref = q(x)
    q._dequant_cache = None
    with kernels.use("native"):
        assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-6)
    assert (q._dequant_cache is None) == (fmt != "bcq")


def test_bad_isa_setting_warns_once_and_falls_back():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import anybit\n"
            "    from anybit import kernels\n"
            "    print(len([x for x in w if 'native kernels unavailable' in str(x.message)]), kernels.backends())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "ANYBIT_ISA": "mmx"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1 ['auto', 'reference']", p.stdout
