"""Every native kernel against the PyTorch reference, on every instruction set this CPU
runs, on odd shapes (K not a multiple of 8/16/64, ragged groups, batch 1 and > 1)."""

import os
import subprocess
import sys

import pytest
import torch

from anybit import kernels
from anybit.formats import ActSpec, FormatSpec, get_format
from anybit.kernels import native
from anybit.nn import QuantLinear

from conftest import ROOT, isas

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built (see setup.py)")


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
def test_int(isa, bits, group, sym, monkeypatch):
    monkeypatch.setattr(native, "INT_ACT8", False)  # the float-activation kernel (the int8 one: below)
    for n, k, m in SHAPES:
        check(QuantLinear.from_linear(linear(n, k), FormatSpec("int", bits, group, sym)), m, k)


def _q8_emulation(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the int8-activation kernel computes, in float64: activations rounded to int8 per
    block with scale max|x|/127, times the dequantized weight (an exact float of the code:
    a float16 scale times a small integer)."""
    n, k = q.shape
    w = q.dequantize_weight().double()
    b = native.q8_block(q.spec, k)
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for k0 in range(0, k, b):
        k1 = min(k, k0 + b)
        amax = x[:, k0:k1].abs().amax(1, keepdim=True)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        xq = torch.round(x[:, k0:k1] * inv).double()
        out += (xq @ w[:, k0:k1].t()) * (amax / 127.0).double()
    return out + (q.bias.double() if q.bias is not None else 0)


Q8_CASES = [("int", b, s) for b in (2, 3, 4, 5, 6, 7, 8) for s in (False, True)] + \
    [("pot", 2, False), ("pot", 3, False), ("pot", 4, False), ("potz", 2, False), ("potz", 3, False),
     ("potz", 4, False)]


@pytest.mark.parametrize("fmt,bits,sym", Q8_CASES)
@pytest.mark.parametrize("group", [64, 128, 256, -1, 32, 96])
def test_int_int8_activations(isa, fmt, bits, sym, group):
    """INT weights against int8 activations (AVX-512 VNNI where the CPU has it and avx512 is
    in use, else AVX2 vpmaddubsw): equal to the emulation of its arithmetic, and within the
    int8 rounding of the float reference; odd N (blocks of 4 or 16 rows padded), K not a
    multiple of the group or of 64, batch 1 to 15 (tiles of 8, 4, 2 and 1 activation rows)."""
    if isa == "scalar":
        assert not native._lib.anybit_has_q8()
        pytest.skip("the int8-activation kernels need AVX2")
    vnni = isa.startswith("avx512") and native.has_vnni()
    want = {"avx512-vnni256": "vnni256", "avx512-tile4": "vnni"}.get(isa, "rows16") if vnni else "avx2"
    assert native.q8_kernel() == want
    assert native.q8_gfni() == (vnni and native.has_gfni() and isa != "avx512-nogfni")
    for n, k, m in [(37, 576, 1), (5, 200, 3), (19, 1536, 5), (4, 64, 2), (9, 300, 4), (11, 640, 7), (21, 256, 15)]:
        opts = {"grid": (0.5, 0.8, 1.0)} if fmt != "int" else {}
        q = QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, group, sym), **opts)
        assert native._q8_usable(q)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k))
        with kernels.use("native"):
            out = q(x)
        emu = _q8_emulation(q, x)
        assert (out.double() - emu).abs().max() <= 1e-5 * emu.abs().max(), (bits, group, n, k, m)
        with kernels.use("reference"):
            ref = q(x)
        assert (out - ref).norm() <= 0.03 * ref.norm()


@pytest.mark.parametrize("fmt,bits,sym", Q8_CASES)
@pytest.mark.parametrize("group", [64, 128, -1])
def test_int8_activations_at_the_int16_limits(isa, fmt, bits, sym, group):
    """The largest products the kernels sum in int16 before widening (codes at their top
    level, every activation at +-127), where a wrong chunk count would wrap: weights +1 but
    for one -1 per 64 inputs, activations all of one sign."""
    if isa == "scalar":
        pytest.skip("the int8-activation kernels need AVX2")
    n, k = 9, 1536
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[:, ::64] = -1.0
    opts = {"grid": (1.0,)} if fmt != "int" else {}
    q = QuantLinear.from_linear(lin, FormatSpec(fmt, bits, group, sym), **opts)
    assert native._q8_usable(q)
    for sign in (1.0, -1.0):
        x = torch.full((3, k), sign)
        with kernels.use("native"):
            out = q(x)
        emu = _q8_emulation(q, x)
        assert (out.double() - emu).abs().max() <= 1e-5 * emu.abs().max(), (sign, out[0, :3], emu[0, :3])


def test_int8_activation_path_only_where_it_applies():
    assert native.pot_levels(FormatSpec("pot", 4, 128)) is None  # ±128 does not fit a byte: two passes
    (first, second), z = native.pot_halves(FormatSpec("pot", 4, 128))
    assert z == 64 and [a + b for a, b in zip(first, second)] == native._pot_level_list(FormatSpec("pot", 4, 128))
    assert max(map(abs, first + second)) == 64 and sum(b != 0 for b in second) == 2  # only ±128 is split
    assert native.pot_halves(FormatSpec("pot", 3, 128)) is None
    assert native.pot_levels(FormatSpec("pot", 3, 128)) == ([1, 2, 4, 8, -1, -2, -4, -8], 8)
    assert native.pot_levels(FormatSpec("potz", 3, 128)) == ([0, 1, 2, 4, 0, -1, -2, -4], 4)
    # groups of 32 (96, ...): the AVX2 layout's int8 kernel (with 256-bit VNNI where it is in use)
    g32 = 32 if native.q8_kernel() is not None else None
    assert native.q8_block(FormatSpec("int", 4, 32), 576) == g32
    assert native.q8_block(FormatSpec("int", 4, 96), 576) == g32
    assert native.q8_block(FormatSpec("int", 4, 16), 576) is None
    assert native.q8_block(FormatSpec("int", 4, 50), 100) is None
    assert native.q8_block(FormatSpec("int", 4, 64), 576) == 64
    assert native.q8_block(FormatSpec("int", 4, 256), 576) == 128
    assert native.q8_block(FormatSpec("int", 4, -1), 172) == 128


@pytest.mark.parametrize("fmt", ["pot", "potz"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1, 24])
@pytest.mark.parametrize("table", [True, False])
def test_pot(isa, fmt, bits, group, table, monkeypatch):
    monkeypatch.setattr(native, "POT_TABLE", table)
    monkeypatch.setattr(native, "INT_ACT8", False)  # the float-activation kernel (the int8 one: below)
    for n, k, m in SHAPES:
        # a short scale grid: the kernel, not the scale search, is under test
        q = QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, group), grid=(0.5, 0.8, 1.0))
        if fmt == "potz":
            assert (q.dequantize_weight() == 0).any()  # the zero code is exercised
        check(q, m, k)


@pytest.fixture
def bcq_float_tables():
    """The float-table BCQ kernel on every ISA (AVX2 otherwise uses int8 tables: below)."""
    prev = native.set_bcq_mode("float")
    yield
    native.set_bcq_mode(prev)


def test_bcq_kernel_layout_keeps_alpha_float16():
    """Layout version 2: the LUT-GEMM reads α as the format stores it (float16, so exactly the
    checkpoint's values, half the bytes of float32), blocked [Npad/16, G, q, 16]; the offset
    stays float32 (the integer-grid conversion needs it exact)."""
    assert native.bcq_layout() == 2
    q = QuantLinear.from_linear(linear(40, 96), FormatSpec("bcq", 3, 32), fit="greedy")
    d = native._prep_bcq(q)
    assert d["alpha"].dtype == torch.float16 and d["offset"].dtype == torch.float32
    assert tuple(d["alpha"].shape) == (3, 3, 3, 16)  # 48 rows padded / 16, 3 groups, q, 16 rows
    assert torch.equal(d["alpha"][1, 2, :, 7], q.alpha[16 + 7, 2])  # row 23, group 2, every bit


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 128, -1, 8])
@pytest.mark.parametrize("fmt", ["bcq", "bcq16"])
def test_bcq(isa, bits, group, fmt, bcq_float_tables):
    for n, k, m in SHAPES:
        check(QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, group), fit="greedy"), m, k)


def _bcq_int8_emulation(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the AVX2 int8-table BCQ kernel computes, in float64: per chunk of 8 activations two
    16-entry tables of Σ ±x (one per index nibble), rounded to int8 with one scale per weight
    group (max Σ|x| over the group's 4-activation sets / 127); lookups summed as integers."""
    n, k = q.shape
    planes = q.planes.long()  # [bits, N, chunks]
    chunks = planes.shape[2]
    g = k if q.spec.group_size == -1 else q.spec.group_size
    ng = q.alpha.shape[1]
    cpg = chunks if ng == 1 else g // 8
    alpha, offset = q.alpha.double(), q.offset.double()  # [N, G, bits], [N, G]
    e = torch.arange(16)
    signs = torch.stack([(e >> u) & 1 for u in range(4)], 1).double() * 2 - 1  # [16, 4]
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for m in range(x.shape[0]):
        xp = torch.nn.functional.pad(x[m].double(), (0, chunks * 8 - k)).view(chunks, 2, 4)
        tables = xp @ signs.t()  # [chunks, 2, 16]
        for gi in range(ng):
            c0, c1 = gi * cpg, (chunks if gi == ng - 1 else (gi + 1) * cpg)
            amax = xp[c0:c1].abs().sum(-1).max().float()
            inv = 127.0 / amax if amax > 0 else torch.tensor(0.0)
            tq = torch.round(tables[c0:c1].float() * inv).double()  # as the kernel: float32, round half even
            st = (amax / 127.0).double()
            b = planes[:, :, c0:c1]  # [bits, N, cc]
            idx = torch.arange(c1 - c0)
            s = tq[idx, 0][None, None].expand(b.shape[0], n, -1, 16).gather(3, (b & 15)[..., None])[..., 0] + \
                tq[idx, 1][None, None].expand(b.shape[0], n, -1, 16).gather(3, (b >> 4)[..., None])[..., 0]
            out[m] += (alpha[:, gi, :].t() * s.sum(-1)).sum(0) * st
            out[m] += offset[:, gi] * x[m, c0 * 8: min(k, c1 * 8)].double().sum()
    return out + (q.bias.double() if q.bias is not None else 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [32, 128, -1, 8, 24, 64])
@pytest.mark.parametrize("isa,mode", [("avx2", "vpshufb"), ("avx512", "vpshufb"), ("avx512", "vnni")])
def test_bcq_int8_tables(bits, group, isa, mode):
    """The int8-table BCQ kernels (vpshufb: AVX2, and AVX-512 without VNNI; vpermb + vpdpbusd over
    quads of chunks: AVX-512 VBMI + VNNI, the default there, groups multiple of 32 or one per
    row; 8 and 24 fall back to vpshufb): equal to the emulation of their arithmetic, and
    within the table rounding of the float reference; odd chunk counts per group (24, 8),
    K not a multiple of 8, chunk counts of every remainder mod 4 (the last quad's missing
    chunks and pair), K long enough for the int16 flush (1536 / 8 > 128 chunks), N split
    into row slices that are not all the same size (600 rows: 160, 160, 160, 128), and a
    product large enough for a thread team (520 x 1024 x 2: every thread reads the caller's
    tables), and a prompt's rows (40, 7, 3: tiles of 4, 2 and 1 activation rows)."""
    if native.cpu_isa() == "scalar":
        pytest.skip("the int8-table BCQ kernel needs AVX2")
    if isa == "avx512" and native.cpu_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    if mode == "vnni" and not native.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    prev, prev_mode = native.isa(), native.set_bcq_mode(mode)
    native.set_isa(isa)
    try:
        for n, k, m in SHAPES + [(19, 1536, 2), (33, 1100, 1), (600, 136, 1), (520, 1024, 2), (48, 200, 40),
                                 (40, 72, 7), (40, 80, 3), (40, 88, 6), (24, 96, 5), (17, 104, 1)]:
            q = QuantLinear.from_linear(linear(n, k), FormatSpec("bcq", bits, group), fit="greedy")
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k))
            with kernels.use("native"):
                out = q(x)
            emu = _bcq_int8_emulation(q, x)
            assert (out.double() - emu).abs().max() <= 1e-5 * emu.abs().max(), (bits, group, n, k, m)
            with kernels.use("reference"):
                ref = q(x)
            assert (out - ref).norm() <= 0.03 * ref.norm()
    finally:
        native.set_isa(prev)
        native.set_bcq_mode(prev_mode)


@pytest.mark.parametrize("wbits,levels,wsym", [(2, 0, False), (3, 5, False), (4, 0, True), (6, 0, True), (8, 0, False)])
@pytest.mark.parametrize("abits", [2, 6, 8])
@pytest.mark.parametrize("act_group,asym", [(-1, True), (-1, False), ("w", False), ("w", True)])
def test_bitplane(isa, wbits, levels, wsym, abits, act_group, asym):
    """AND+popcount (AVX-512, portable, groups of 32) and the integer-dot kernel (AVX2, AVX-512 VNNI:
    groups of 64k, ragged last group, per channel with K not a multiple of 64); 5 and 20 rows:
    the integer-dot kernel's unpacked-block buffer (a prompt's rows)."""
    for n, k, m in SHAPES + [(9, 300, 5), (13, 200, 20)]:
        for group in (32, 64, -1) if k != 576 else (128,):
            act = ActSpec(abits, group if act_group == "w" else -1, not asym)
            q = QuantLinear.from_linear(linear(n, k), FormatSpec("bitplane", wbits, group, wsym, levels), act=act)
            dots = isa == "avx2" or isa.startswith("avx512") and native.has_vnni()
            assert native.bitplane_dots(q) == (dots and group != 32)
            check(q, m, k, rtol=1e-4)


def test_pot_dequantize_kernel_is_bit_exact_and_int_matches():
    for fmt in ("pot", "potz", "int"):
        q = QuantLinear.from_linear(linear(40, 300), FormatSpec(fmt, 3, 64))
        for name in isas():
            native.set_isa(name.split("-")[0])
            w = native.dequantize(q)
            if fmt != "int":
                assert torch.equal(w, q.dequantize_weight())
                assert torch.equal(native.dequantize(q, pot_table=False), w)
            else:
                assert torch.allclose(w, q.dequantize_weight(), rtol=1e-6, atol=1e-7)
            assert isinstance(native.dequantize(q, scratch_only=True), float)


@pytest.mark.parametrize("fmt", ["int", "pot", "bcq"])
def test_large_batches_dequantize_then_blas(fmt):
    """Above MAX_ROWS (and the int8 kernel's, and BCQ's LUT-GEMM's) rows: a dequantized
    weight in the scratch buffer and BLAS (no float copy cached on the layer, BCQ included)."""
    q = QuantLinear.from_linear(linear(8, 64), FormatSpec(fmt, 3, 32))
    x = torch.randn(max(native.q8_rows(), native.BCQ_MAX_ROWS) + 1, 64)  # above every kernel's rows
    with kernels.use("reference"):
        ref = q(x)
    q._dequant_cache = None
    with kernels.use("native"):
        assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-6)
    assert q._dequant_cache is None


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


def read_rows16(w: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The codes ``[n, k]`` of a version-2 rows16 layout, read as kernels_q8_rows16.inc documents it:
    blocks of 16 rows, chunk q = codes 4q..4q+3 of each row; groups of P chunks holding each
    piece's 64-byte lines (8/width chunks each, chunk j in bits width·j), narrowest piece first."""
    pieces = sorted(native.Q8_PIECES[bits])
    P = max(1 if wd == 8 else 8 // wd for wd, _ in pieces)
    piece_bytes = {wd: P * 64 if wd == 8 else P * wd // 8 * 64 for wd, _ in pieces}  # per group
    gb = sum(piece_bytes.values())
    kp = -(-k // 64) * 64
    out = torch.zeros(w.shape[0] * 16, kp, dtype=torch.int64)
    for b in range(w.shape[0]):
        blk = w[b].to(torch.int64)
        for q in range(kp // 4):
            g, j = divmod(q, P)
            base, code = g * gb, torch.zeros(64, dtype=torch.int64)
            for wd, shift in pieces:
                per = 1 if wd == 8 else 8 // wd
                line = blk[base + j // per * 64: base + j // per * 64 + 64]
                code |= ((line >> (wd * (j % per))) & ((1 << wd) - 1)) << shift
                base += piece_bytes[wd]
            out[16 * b: 16 * b + 16, 4 * q: 4 * q + 4] = code.view(16, 4)
    return out[:n, :k]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_rows16_layout_is_as_documented(bits):
    """The rows-in-lanes layout (version 2): codes in 1-bit lines, a group's narrowest piece first,
    read back by the documented rule; float16 scales and uint8 zero points, 3 bytes per row and
    group (the kernel forms s·z), equal to the format's own."""
    if native.q8_kernel() != "rows16":
        pytest.skip("the rows-in-lanes int8 kernel is not in use here (AVX-512 VNNI, ANYBIT_Q8_ROWS16)")
    assert native.q8_rl_layout() == 3
    n, k = 37, 300
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    assert torch.equal(read_rows16(native.q8_layout_rows16(codes, bits), bits, n, k), codes.long())
    q = QuantLinear.from_linear(linear(n, k), FormatSpec("int", bits, 128, sym=False))
    d = native._prep_int_q8(q)
    assert d["rows"] == 16 and d["scales"].dtype == torch.float16 and d["szs"].dtype == torch.uint8
    _, scales, zeros = native.intfmt.IntFormat().unpack(q.packed(), q.spec, q.shape)
    assert torch.equal(d["scales"].float(), native.q8_rows16_values(scales))
    assert torch.equal(d["szs"].float(), native.q8_rows16_values(zeros))


@pytest.mark.parametrize("act_group,asym", [(-1, True), ("w", False), ("w", True)])
def test_rows16_bitplane_zero_point_term_by_activation_grouping(act_group, asym):
    """Layout version 3: the bit-plane term of the activations' zero point is one float32 per row
    for per-token activations (the row's sum of dequantized weights), absent for symmetric
    per-group ones, and int32 U − cnt·a per row and group for asymmetric per-group ones."""
    if native.q8_kernel() != "rows16":
        pytest.skip("the rows-in-lanes int8 kernel is not in use here (AVX-512 VNNI, ANYBIT_Q8_ROWS16)")
    n, k, group = 37, 300, 64
    act = ActSpec(8, group if act_group == "w" else -1, not asym)
    q = QuantLinear.from_linear(linear(n, k), FormatSpec("bitplane", 3, group), act=act)
    d = native._prep_bitplane_dots(q)
    codes, scales, zeros = get_format("bitplane").unpack(q.packed(), q.spec, q.shape)
    blocks = -(-n // 16)
    if act_group == -1:
        assert d["U"].dtype == torch.float32 and d["U"].shape == (blocks, 16)
        rowsum = q.dequantize_weight().double().sum(1)
        assert torch.allclose(d["U"].flatten()[:n].double(), rowsum, rtol=1e-5, atol=1e-5 * rowsum.abs().max())
        assert not d["U"].flatten()[n:].any()
    elif not asym:
        assert d["U"].numel() == 0
    else:
        ng = -(-k // group)
        cnt = torch.clamp(k - torch.arange(ng) * group, max=group)
        u = torch.nn.functional.pad(codes.long(), (0, ng * group - k)).view(n, ng, group).sum(-1)
        assert d["U"].dtype == torch.int32
        assert torch.equal(d["U"], native.q8_rows16_values((u - cnt * zeros.long()).to(torch.int32)))


def assert_plan_equals_parts(plan, mods: list, k: int) -> None:
    """A fused plan's output on 1 and 5 rows is its parts' outputs side by side, bit for bit."""
    for m in (1, 5):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        with kernels.use("native"):
            parts = torch.cat([q(x) for q in mods], 1)
        assert torch.equal(plan(x), parts)


@pytest.mark.parametrize("fmt,bits", [("int", 3), ("int", 8), ("pot", 4)])
def test_fused_int8_plan_equals_its_parts(isa, fmt, bits):
    """Q/K/V-style plans (one int8 kernel call over several linears' rows) give each part's own
    output, bit for bit, in each kernel's layout (blocks of 16 rows for the rows-in-lanes
    kernel, of 4 otherwise); parts whose rows do not fill whole blocks get no plan."""
    if isa == "scalar":
        pytest.skip("the int8-activation kernels need AVX2")
    k = 200
    mods = [QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, 64)) for n in (48, 16, 32)]
    plan = native.q8_plan(mods)
    assert plan is not None
    assert_plan_equals_parts(plan, mods, k)
    ragged = [QuantLinear.from_linear(linear(n, k), FormatSpec(fmt, bits, 64)) for n in (20, 8)]
    assert (native.q8_plan(ragged) is None) == (native.q8_kernel() == "rows16")


@pytest.mark.parametrize("wbits,abits,act_group", [(6, 6, "w"), (4, 8, -1), (2, 8, -1)])
def test_fused_bitplane_plan_equals_its_parts(isa, wbits, abits, act_group):
    """Q/K/V-style plans of bit-plane linears (one integer-dot call, the activations quantized
    once) give each part's own output bit for bit, in each kernel's layout; parts that do not
    fill whole blocks of rows, or that differ in their activation spec, get no plan."""
    if isa == "scalar" or (isa.startswith("avx512") and not native.has_vnni()):
        pytest.skip("the integer-dot bit-plane kernels need AVX2 or AVX-512 VNNI")
    k, group = 200, 64
    act = ActSpec(abits, group if act_group == "w" else -1, act_group == "w")
    spec = FormatSpec("bitplane", wbits, group, act_group == "w")
    mods = [QuantLinear.from_linear(linear(n, k), spec, act=act) for n in (48, 16, 32)]
    plan = native.bitplane_plan(mods)
    assert plan is not None
    assert_plan_equals_parts(plan, mods, k)
    ragged = [QuantLinear.from_linear(linear(n, k), spec, act=act) for n in (20, 8)]
    assert (native.bitplane_plan(ragged) is None) == (native.q8_kernel() == "rows16")
    other_act = ActSpec(8, -1, False) if abits != 8 else ActSpec(6, -1, True)
    other = QuantLinear.from_linear(linear(16, k), spec, act=other_act)
    assert native.bitplane_plan([mods[0], other]) is None


def test_one_module_serves_decode_and_prefill_layouts():
    """A module used by the int8 kernel (few rows) and by dequantize + BLAS (many rows) keeps
    both kernel layouts; each stays correct."""
    q = QuantLinear.from_linear(linear(40, 256), FormatSpec("int", 4, 128))
    with kernels.use("reference"):
        ref_small, ref_big = q(torch.ones(1, 256)), q(torch.ones(40, 256))
    with kernels.use("native"):
        for _ in range(2):
            small, big = q(torch.ones(1, 256)), q(torch.ones(40, 256))
            assert (small - ref_small).norm() <= 0.03 * ref_small.norm()
            assert torch.allclose(big, ref_big, atol=1e-4)


def test_tensors_off_the_cpu_never_reach_the_native_kernels():
    """The dispatch asks where the input lives: a meta (or CUDA) tensor takes the reference
    backend, which handles any device, instead of handing a non-CPU pointer to C."""
    from anybit.formats import FormatSpec
    from anybit.nn import QuantLinear

    for fmt in ("int", "pot", "bcq"):
        m = QuantLinear(64, 32, FormatSpec(fmt, 3, 32), device="meta")
        y = m(torch.randn(1, 64, device="meta"))
        assert y.shape == (1, 32) and y.device.type == "meta"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [8, 64, -1])
def test_bcq_dequantize_and_long_prompts(bits, group):
    """BCQ's table-lookup dequantize kernel (prompts longer than the LUT-GEMM takes: the float
    weight goes to the scratch buffer, none stays cached on the layer) against the format's own
    dequantize; odd N and K."""
    for n, k in [(37, 200), (5, 72), (64, 576)]:
        q = QuantLinear.from_linear(linear(n, k), FormatSpec("bcq", bits, group))
        w = native.bcq_dequantize(q)
        torch.testing.assert_close(w, q.dequantize_weight(), rtol=1e-6, atol=1e-6)
        m = native.BCQ_MAX_ROWS + 5
        check(q, m, k)
        q._dequant_cache = None  # the reference run in check() caches its float weight
        with kernels.use("native"):
            q(torch.randn(m, k))
        assert q._dequant_cache is None


@pytest.mark.parametrize("bias", [False, True])
def test_f32_linear_kind(isa, bias):
    """Kind 4 of the native decoding step (a float32 nn.Linear read in place): equal to F.linear
    to float rounding on odd shapes (N not a multiple of the 4-row block, K not of the vector
    width), 1 and several activation rows, one and two threads; at batch 1 a thread's rows are
    read as four quarters side by side, so also fewer rows than quarters (1, 3, 9 rows); from 4
    activation rows, register tiles of 4 x 6 (AVX-512; 4 x 3 otherwise) with K in chunks of 2048
    and rows in chunks of 64, so rows and N not multiples of the tile, K past a chunk."""
    import ctypes

    for n, k, m in [(37, 101, 1), (4, 64, 3), (130, 576, 2), (3, 17, 1), (1, 33, 1), (9, 48, 1), (70, 576, 1),
                    (13, 2100, 5), (70, 576, 9), (7, 40, 70), (20, 33, 133), (5, 16, 4)]:
        lin = torch.nn.Linear(k, n, bias=bias)
        st = native.lin_struct(lin)
        assert st is not None and st.kind == 4
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(n + k))
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
        for threads in (1, 2):
            y = torch.full((m, n), float("nan"))
            native._lib.anybit_lin_rows(ctypes.byref(st), x.data_ptr(), m, y.data_ptr(), threads)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert native.lin_struct(torch.nn.Linear(8, 8).double()) is None  # float32 only


def test_f32_linear_routes_by_rows():
    """native.f32_linear: the native float GEMM up to f32_gemm_rows(K) rows (any leading shape),
    PyTorch's F.linear beyond, for other dtypes and where autograd needs the graph."""
    calls = []
    real = native._lib.anybit_lin_rows
    try:
        native._lib.anybit_lin_rows = lambda *a: (calls.append(a[2]), real(*a))[1]
        for k, want in ((64, 8), (300, 16), (600, 64), (1100, 128)):
            lin = torch.nn.Linear(k, 50)
            most = native.f32_gemm_rows(k)
            assert most == min(native.F32_GEMM_ROWS, want)
            calls.clear()
            with torch.no_grad():
                for shape in [(1, k), (2, 3, k), (most, k), (most + 1, k)]:
                    x = torch.randn(*shape)
                    y = native.f32_linear(x, lin.weight, lin.bias)
                    assert y.shape == (*shape[:-1], 50)
                    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias),
                                               atol=1e-5, rtol=1e-5)
                assert calls == [1, 6, most]  # the last call went to BLAS
                native.f32_linear(torch.randn(3, k).double(), lin.weight.double())
            native.f32_linear(torch.randn(3, k), lin.weight, lin.bias)  # weight requires grad: BLAS
            assert calls == [1, 6, most]
    finally:
        native._lib.anybit_lin_rows = real
