import pytest
import torch

from anybit.formats import FormatSpec, get_format
from anybit.formats import bcq
from anybit.formats import int as intfmt

FMT = get_format("bcq")


def _w(n=16, k=172, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_alternating_improves_on_greedy(bits, group):
    w = _w()
    spec = FormatSpec("bcq", bits, group)
    err = {}
    for fit in ("greedy", "alternating"):
        packed = FMT.quantize(w, spec, fit=fit)
        err[fit] = ((w - FMT.dequantize(packed, spec, tuple(w.shape))) ** 2).mean().item()
    assert err["alternating"] <= err["greedy"] * 1.0001
    if bits >= 2:
        assert err["alternating"] < err["greedy"]


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (3, 32, True), (3, -1, False), (4, 64, False)])
def test_uniform_grid_converts_exactly(bits, group, sym):
    w = _w()
    ispec = FormatSpec("int", bits, group, sym)
    s, z = intfmt.group_params(w, ispec)
    codes = intfmt.encode(w, s, z, ispec)
    b, alpha, offset = bcq.from_int(codes, s, z, bits, group)
    spec = FormatSpec("bcq", bits, group)
    packed = FMT.pack(FMT.Parts(bcq.signs_of(b, tuple(w.shape)), alpha, offset), spec, tuple(w.shape))
    assert torch.equal(packed["alpha"].float(), alpha)  # s/2·2^i is a float16 number
    got = FMT.dequantize(packed, spec, tuple(w.shape))
    assert torch.allclose(got, intfmt.decode(codes, s, z, ispec), rtol=1e-6, atol=1e-7)


def test_pack_round_trip_and_layout():
    w = _w(5, 13)
    spec = FormatSpec("bcq", 3, 8)
    packed = FMT.quantize(w, spec)
    assert packed["planes"].shape == (3, 5, 2) and packed["alpha"].shape == (5, 2, 3)
    parts = FMT.unpack(packed, spec, (5, 13))
    again = FMT.pack(parts, spec, (5, 13))
    b = torch.nn.functional.pad(parts.signs.permute(1, 2, 0), (0, 0, 0, 3), value=1.0).reshape(5, 2, 8, 3)
    assert torch.equal(bcq.signs_of(b, (5, 13)), parts.signs)  # the fits' group-padded form
    for k in packed:
        assert torch.equal(packed[k], again[k])


def test_bits_per_weight():
    spec = FormatSpec("bcq", 3, 128)
    assert FMT.bits_per_weight(spec, (64, 1024)) == pytest.approx(3 + (3 * 16 + 32) / 128)


def test_half_offset_format_stores_float16_offsets_and_costs_16_bits_per_group_less():
    w = _w()
    spec16, spec32 = FormatSpec("bcq16", 3, 32), FormatSpec("bcq", 3, 32)
    p16 = get_format("bcq16").quantize(w, spec16)
    assert p16["offset"].dtype == torch.float16
    deq = get_format("bcq16").dequantize(p16, spec16, tuple(w.shape))
    assert ((w - deq) ** 2).mean() < 0.1 * (w ** 2).mean()
    diff = FMT.bits_per_weight(spec32, tuple(w.shape)) - get_format("bcq16").bits_per_weight(spec16, tuple(w.shape))
    assert abs(diff - 16 * 6 / 172) < 1e-9  # 6 groups of the 172 columns
