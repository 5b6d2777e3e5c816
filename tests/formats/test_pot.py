import pytest
import torch

from anybit.formats import FormatSpec, get_format
from anybit.formats import pot

FMT = get_format("pot")
GRID = tuple(0.01 * i for i in range(5, 201, 5))  # a coarser grid than the default, for speed


def _w(n=16, k=172, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_are_signed_powers_of_two(bits):
    spec = FormatSpec("pot", bits, -1)
    s = torch.tensor([[0.5]])
    w = torch.linspace(-80, 80, 401).reshape(1, -1)
    levels = set(pot.decode(pot.encode(w, s, spec), s, spec).unique().tolist())
    expected = {sg * 0.5 * 2.0**e for sg in (-1, 1) for e in range(pot.max_exponent(bits) + 1)}
    assert levels == expected  # no zero level


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_level_format_levels(bits):
    spec = FormatSpec("potz", bits, -1)
    s = torch.tensor([[0.5]])
    w = torch.linspace(-80, 80, 401).reshape(1, -1)
    codes = pot.encode(w, s, spec)
    levels = set(pot.decode(codes, s, spec).unique().tolist())
    expected = {0.0} | {sg * 0.5 * 2.0**e for sg in (-1, 1) for e in range(pot.max_exponent(bits))}
    assert levels == expected
    # |w| < s/2 -> code 0 with the sign cleared; just above -> ±s
    small = pot.encode(torch.tensor([[-0.24, 0.24, -0.26, 0.26]]), s, spec)
    assert small.tolist() == [[0, 0, (1 << (bits - 1)) | 1, 1]]
    assert pot.top_exponent(spec) == pot.max_exponent(bits) - 1


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nearest_level_of_the_grid_search(fmt, bits):
    """init_scales' vectorised error equals the error of encode/decode at the chosen scale,
    also for ragged groups (padding must not count)."""
    w = _w(k=150)
    spec = FormatSpec(fmt, bits, 64)
    s = pot.init_scales(w, spec, grid=GRID)
    for beta in (0.9, 1.1):
        assert pot.group_error(w, s, spec).sum() <= pot.group_error(w, (s * beta).half().float(), spec).sum() + 1e-9


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exponent_add_is_bit_identical(fmt, dtype, bits):
    spec = FormatSpec(fmt, bits, 32)
    g = torch.Generator().manual_seed(bits)
    scales = (torch.rand(9, 6, generator=g) * 0.1 + 1e-3).to(dtype)
    scales[0, 0] = -scales[0, 0]  # a negative scale: its sign XORs with the code's
    codes = torch.randint(0, 1 << bits, (9, 172), generator=g, dtype=torch.uint8)
    fast = pot.dequantize_exponent_add(codes, scales, spec)
    k = codes.shape[-1]
    s = pot.expand_groups(scales, 32, k)
    e = (codes & pot.max_exponent(bits)).to(dtype)
    sign = (1 - 2 * (codes >> (bits - 1)).to(torch.int32)).to(dtype)
    if fmt == "potz":  # code 0 is +0, code m is s·2^(m−1)
        plain = torch.where(e == 0, torch.zeros((), dtype=dtype), s * sign * torch.exp2(e - 1))
        assert (fast == 0).any()
    else:
        plain = s * sign * torch.exp2(e)
    assert fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       plain.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_grid_search_beats_base_scales_and_round_trips(fmt, bits, group):
    w = _w()
    spec = FormatSpec(fmt, bits, group)
    FMT = get_format(fmt)
    for rule in ("pow", "range"):
        s0 = pot.base_scale(w, spec, rule).to(torch.float16).float()
        s = pot.init_scales(w, spec, rule, grid=GRID)
        assert (pot.group_error(w, s, spec) <= pot.group_error(w, s0, spec) + 1e-9).all()
    packed = FMT.quantize(w, spec, grid=GRID)
    codes, scales = FMT.unpack(packed, spec, tuple(w.shape))
    again = FMT.pack(FMT.Parts(codes, scales.float()), spec, tuple(w.shape))
    assert all(torch.equal(packed[k], again[k]) for k in packed)
    assert torch.equal(FMT.dequantize(packed, spec, tuple(w.shape)), pot.decode(codes, scales.float(), spec))


def test_bits_per_weight_and_validation():
    from anybit.errors import AnybitError

    assert FMT.bits_per_weight(FormatSpec("pot", 3, 128), (64, 1024)) == pytest.approx(3 + 16 / 128)
    with pytest.raises(AnybitError):
        FMT.validate(FormatSpec("pot", 5, 128))


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("group", [64, 50, -1])
def test_scale_search_by_blocks_of_rows_equals_the_whole(fmt, group, monkeypatch):
    """init_scales searches blocks of rows (cache-sized): the same scales, bit for bit, as one
    search over the whole weight, ragged last block and ragged groups included."""
    spec = FormatSpec(fmt, 3, group)
    w = torch.randn(37, 150, generator=torch.Generator().manual_seed(3)) * 0.02
    w[4, 10:90] = 0
    monkeypatch.setattr(pot, "_SEARCH_ELEMENTS", 10 ** 9)
    whole = pot.init_scales(w, spec)
    monkeypatch.setattr(pot, "_SEARCH_ELEMENTS", 5 * 150)  # blocks of 5 rows
    assert torch.equal(pot.init_scales(w, spec), whole)
