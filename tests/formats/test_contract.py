"""The contract every registered weight format keeps, looped over the registry (a new format
is tested by registering it): packed tensors as its layout says, deterministic,
``pack(unpack(p)) == p`` with its named parts, bits per
weight as stored, error falling with bits, and a QuantLinear computing x·Ŵᵀ with the
dequantized weight, on odd shapes and group sizes that do not divide K."""

import pytest
import torch

from anybit import kernels
from anybit.formats import FORMATS, FormatSpec
from anybit.nn import QuantLinear

SHAPES = [(13, 70), (16, 96)]
GROUPS = [-1, 32]


def _cases():
    for name, fmt in FORMATS.items():
        for bits in sorted({fmt.min_bits, min(fmt.max_bits, 4), min(fmt.max_bits, 8)}):
            for group in GROUPS:
                for sym in ((False, True) if name in ("int", "bitplane") else (False,)):
                    yield pytest.param(name, bits, group, sym, id=f"{name}-w{bits}-g{group}{'-sym' if sym else ''}")


def _w(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)


@pytest.mark.parametrize("name,bits,group,sym", list(_cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_format_contract(name, bits, group, sym, shape):
    fmt = FORMATS[name]
    spec = FormatSpec(name, bits, group, sym)
    fmt.validate(spec)
    w = _w(shape)
    packed = fmt.quantize(w, spec)
    layout = fmt.packed_layout(spec, shape)
    assert set(packed) == set(layout)
    for k, (shp, dtype) in layout.items():
        assert tuple(packed[k].shape) == tuple(shp) and packed[k].dtype == dtype, k
    again = fmt.quantize(w.clone(), spec)
    assert all(torch.equal(packed[k], again[k]) for k in packed)  # same input, same bytes
    parts = fmt.unpack(packed, spec, shape)  # the one pack/unpack signature: pack(unpack(p)) == p
    assert isinstance(parts, fmt.Parts) and fmt.Parts is not tuple
    repacked = fmt.pack(parts, spec, shape)
    assert set(repacked) == set(packed) and all(torch.equal(packed[k], repacked[k]) for k in packed)
    stored = sum(t.numel() * t.element_size() * 8 for t in packed.values())
    assert fmt.bits_per_weight(spec, shape) == pytest.approx(stored / (shape[0] * shape[1]))
    wq = fmt.dequantize(packed, spec, shape)
    assert wq.shape == shape and wq.dtype == torch.float32 and torch.isfinite(wq).all()
    assert (wq - w).pow(2).mean() < w.pow(2).mean()  # it approximates w at all
    m = QuantLinear.from_packed(packed, spec, shape)
    x = _w((3, shape[1]), seed=1)
    with kernels.use("reference"):
        torch.testing.assert_close(m(x), x @ wq.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(FORMATS))
def test_more_bits_less_error(name):
    fmt = FORMATS[name]
    w = _w((32, 128))
    errs = []
    for bits in range(fmt.min_bits, min(fmt.max_bits, 6) + 1):
        spec = FormatSpec(name, bits, 32)
        errs.append(float((fmt.dequantize(fmt.quantize(w, spec), spec, w.shape) - w).pow(2).mean()))
    assert errs[-1] < errs[0], errs
