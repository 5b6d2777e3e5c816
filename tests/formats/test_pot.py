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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exponent_add_is_bit_identical(dtype, bits):
    spec = FormatSpec("pot", bits, 32)
    g = torch.Generator().manual_seed(bits)
    scales = (torch.rand(9, 6, generator=g) * 0.1 + 1e-3).to(dtype)
    scales[0, 0] = -scales[0, 0]  # a negative scale: its sign XORs with the code's
    codes = torch.randint(0, 1 << bits, (9, 172), generator=g, dtype=torch.uint8)
    fast = pot.dequantize_exponent_add(codes, scales, spec)
    k = codes.shape[-1]
    s = pot.expand_groups(scales, 32, k)
    e = (codes & pot.max_exponent(bits)).to(dtype)
    sign = (1 - 2 * (codes >> (bits - 1)).to(torch.int32)).to(dtype)
    plain = s * sign * torch.exp2(e)
    assert fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       plain.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_grid_search_beats_base_scales_and_round_trips(bits, group):
    w = _w()
    spec = FormatSpec("pot", bits, group)
    for rule in ("pow", "range"):
        s0 = pot.base_scale(w, spec, rule).to(torch.float16).float()
        s = pot.init_scales(w, spec, rule, grid=GRID)
        assert (pot.group_error(w, s, spec) <= pot.group_error(w, s0, spec) + 1e-9).all()
    packed = FMT.quantize(w, spec, grid=GRID)
    codes, scales = FMT.unpack(packed, spec, tuple(w.shape))
    again = FMT.pack(codes, scales.float(), spec)
    assert all(torch.equal(packed[k], again[k]) for k in packed)
    assert torch.equal(FMT.dequantize(packed, spec, tuple(w.shape)), pot.decode(codes, scales.float(), spec))


def test_bits_per_weight_and_validation():
    from anybit.errors import AnybitError

    assert FMT.bits_per_weight(FormatSpec("pot", 3, 128), (64, 1024)) == pytest.approx(3 + 16 / 128)
    with pytest.raises(AnybitError):
        FMT.validate(FormatSpec("pot", 5, 128))
