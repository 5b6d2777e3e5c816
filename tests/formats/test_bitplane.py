import pytest
import torch

from anybit.formats import FormatSpec, bitpack, get_format
from anybit.formats import int as intfmt


@pytest.mark.parametrize("k,group", [(172, 32), (172, -1), (576, 128), (100, 64), (7, 3)])
@pytest.mark.parametrize("bits", [1, 3, 6, 8])
def test_planes_round_trip(k, group, bits):
    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    planes = bitpack.pack_planes(codes, bits, group)
    g = k if group == -1 else group
    assert planes.shape == (bits, 5, -(-k // g), bitpack.plane_group_bytes(g))
    assert torch.equal(bitpack.unpack_planes(planes, bits, k, group), codes)


@pytest.mark.parametrize("spec", [FormatSpec("bitplane", 4, 32), FormatSpec("bitplane", 6, 128, True),
                                  FormatSpec("bitplane", 3, 32, levels=5), FormatSpec("bitplane", 8, -1)])
def test_same_grid_as_int(spec):
    w = torch.randn(12, 172)
    fmt = get_format("bitplane")
    ispec = FormatSpec("int", spec.bits, spec.group_size, spec.sym, spec.levels)
    expected = get_format("int").dequantize(get_format("int").quantize(w, ispec), ispec, w.shape)
    packed = fmt.quantize(w, spec)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == \
        {k: v for k, v in fmt.packed_layout(spec, w.shape).items()}
    assert torch.equal(fmt.dequantize(packed, spec, w.shape), expected)


def test_bit_balance_grid_has_five_levels():
    spec = FormatSpec("int", 3, 64, levels=5)
    w = torch.randn(8, 128)
    codes = intfmt.encode(w, *intfmt.group_params(w, spec), spec)
    assert codes.max() <= 4 and len(codes.unique()) == 5


def test_popcount_identity_of_the_layout():
    """Σ_i Σ_j c_i c_j popcount(W_i AND X_j) over one group's words equals the integer dot
    product, with the MSB plane negated for two's-complement operands (the kernel's math)."""
    g = torch.Generator().manual_seed(0)
    k, wb, xb = 100, 3, 5
    wq = torch.randint(-4, 4, (k,), generator=g)  # signed 3-bit
    xq = torch.randint(0, 32, (k,), generator=g)  # unsigned 5-bit
    wp = bitpack.pack_planes((wq & 7).to(torch.uint8)[None], wb, -1)[:, 0, 0]
    xp = bitpack.pack_planes(xq.to(torch.uint8)[None], xb, -1)[:, 0, 0]
    total = 0
    for i in range(wb):
        ci = -(1 << i) if i == wb - 1 else 1 << i
        for j in range(xb):
            both = int.from_bytes(bytes((wp[i] & xp[j]).tolist()), "little")
            total += ci * (1 << j) * bin(both).count("1")
    assert total == int((wq * xq).sum())


def test_bits_per_weight_counts_word_padding():
    fmt = get_format("bitplane")
    assert fmt.bits_per_weight(FormatSpec("bitplane", 6, 128, True), (512, 512)) == pytest.approx(6 + 16 / 128)
    # K = 576 = 4.5 groups: the half group is padded to a whole one
    assert fmt.bits_per_weight(FormatSpec("bitplane", 6, 128, True), (576, 576)) == pytest.approx((6 * 640 + 16 * 5) / 576)
    # g32 in 64-bit words: half of every word is padding
    assert fmt.bits_per_weight(FormatSpec("bitplane", 4, 32, True), (64, 64)) == pytest.approx(8 + 16 / 32)
