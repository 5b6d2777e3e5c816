import math

import pytest
import torch

from anybit.errors import AnybitError
from anybit.formats import FormatSpec, get_format
from anybit.formats import int as intfmt

FMT = get_format("int")


def _w(n=12, k=172, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [-1, 32, 64, 128, 172, 500])
def test_quantize_error_within_half_step(bits, sym, group):
    w = _w()
    spec = FormatSpec("int", bits, group, sym)
    packed = FMT.quantize(w, spec)
    w_hat = FMT.dequantize(packed, spec, tuple(w.shape))
    s, _ = intfmt.group_params(w, spec)
    step = intfmt.expand_groups(s, group, w.shape[1])
    # within half a step, plus what rounding the scale to float16 can shift the grid ends
    tol = step * (0.5 + (1 << bits) * 2.0**-11) + 1e-6
    assert ((w - w_hat).abs() <= tol).all()
    codes, _, _ = FMT.unpack(packed, spec, tuple(w.shape))
    assert int(codes.max()) < (1 << bits)


def test_grid_values_are_exact_and_sym_range():
    spec = FormatSpec("int", 4, -1, True)
    w = torch.tensor([[-7.0, -3.0, 0.0, 2.0, 7.0]])
    w_hat = FMT.dequantize(FMT.quantize(w, spec), spec, (1, 5))
    assert torch.allclose(w_hat, w)
    assert intfmt.qrange(4, True) == (-8, 7) and intfmt.qrange(3, False) == (0, 7)


def test_asym_keeps_zero_exact():
    spec = FormatSpec("int", 3, 4, False)
    w = torch.tensor([[0.0, 0.3, 0.7, 1.0, -1.0, 0.0, 0.5, 0.25]])
    w_hat = FMT.dequantize(FMT.quantize(w, spec), spec, (1, 8))
    assert w_hat[0, 0] == 0 and w_hat[0, 5] == 0


def test_ragged_groups_are_independent():
    spec = FormatSpec("int", 4, 32, False)
    w = _w(3, 172)
    w2 = w.clone()
    w2[:, 160:] *= 100  # the ragged last group (12 columns) gets a big range
    a = FMT.dequantize(FMT.quantize(w, spec), spec, (3, 172))
    b = FMT.dequantize(FMT.quantize(w2, spec), spec, (3, 172))
    assert torch.equal(a[:, :160], b[:, :160])
    assert intfmt.num_groups(32, 172) == 6


@pytest.mark.parametrize("bits,group,sym", [(3, 128, False), (4, 128, True), (2, 64, False), (8, -1, False)])
def test_bits_per_weight_counts_codes_scales_zeros(bits, group, sym):
    n, k = 64, 1024
    spec = FormatSpec("int", bits, group, sym)
    g = k if group == -1 else group
    expected = bits + 16 / g + (0 if sym else bits / g)
    assert math.isclose(FMT.bits_per_weight(spec, (n, k)), expected, rel_tol=1e-9)
    packed = FMT.quantize(_w(n, k), spec)
    assert sum(t.numel() * t.element_size() * 8 for t in packed.values()) == expected * n * k


def test_pack_unpack_round_trip():
    spec = FormatSpec("int", 3, 32, False)
    w = _w()
    packed = FMT.quantize(w, spec)
    codes, s, z = FMT.unpack(packed, spec, tuple(w.shape))
    again = FMT.pack(FMT.Parts(codes, s, z), spec, tuple(w.shape))
    for k in packed:
        assert torch.equal(packed[k], again[k])


@pytest.mark.parametrize("bits,group", [(1, 128), (9, 128), (0, 128), (4, 0), (4, -2)])
def test_validate_rejects_impossible(bits, group):
    with pytest.raises(AnybitError):
        FMT.validate(FormatSpec("int", bits, group, False))


def test_shrink_clips_range():
    spec = FormatSpec("int", 4, -1, True)
    w = torch.tensor([[1.0, 0.1, -0.2, 0.3]])
    s_full, _ = intfmt.group_params(w, spec)
    s_half, _ = intfmt.group_params(w, spec, shrink=0.5)
    assert torch.isclose(s_half, s_full / 2, rtol=1e-3).all()


def test_signed_rule_is_ggmls_q4_0_grid():
    """sym_rule=signed: s = w_ext / -2^(b-1), the weight of largest magnitude on code 0 exactly."""
    from anybit.formats.int import decode, encode, group_params

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    spec = FormatSpec("int", 4, 32, True)
    s, z = group_params(w, spec, 1.0, "signed")
    q = encode(w, s, z, spec)
    wq = decode(q, s, z, spec)
    g = w.reshape(16, 2, 32)
    ext = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(s, (ext / -8).to(torch.float16).float())
    assert (s < 0).any() and (s > 0).any()
    assert int(q.min()) == 0 and int(q.max()) <= 15
    err = {r: (decode(encode(w, *group_params(w, spec, 1.0, r), spec), *group_params(w, spec, 1.0, r), spec) - w)
           .pow(2).mean() for r in ("absmax", "signed")}
    assert err["signed"] < err["absmax"]
    # the side opposite the extreme has one level fewer: errors up to one step there
    assert (wq - w).abs().max() <= s.abs().max() + 1e-6


@pytest.mark.parametrize("sym", [False, True])
def test_row_blocks_give_the_whole_matrix_result(monkeypatch, sym):
    """quantize/dequantize work in blocks of rows (bounded temporaries for a large head):
    the same bytes as one block, with a ragged last block and a per-group shrink."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 70, generator=g)
    spec = FormatSpec("int", 3, 32, sym)
    fmt = get_format("int")
    shrink = 0.8 + 0.2 * torch.rand(37, 3, generator=g)
    whole = fmt.quantize(w, spec, shrink=shrink)
    whole_w = fmt.dequantize(whole, spec, (37, 70))
    monkeypatch.setattr(intfmt, "rows_per_chunk", lambda k: 5)
    blocks = fmt.quantize(w, spec, shrink=shrink)
    assert whole.keys() == blocks.keys() and all(torch.equal(whole[n], blocks[n]) for n in whole)
    assert torch.equal(fmt.dequantize(blocks, spec, (37, 70)), whole_w)
    s, z = intfmt.group_params(w, spec)
    given = fmt.quantize(w, spec, scales=s, zeros=z)
    assert torch.equal(given["qweight"], fmt.quantize(w, spec)["qweight"])
