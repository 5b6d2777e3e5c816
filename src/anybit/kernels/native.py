"""The native CPU backend: AVX-512 / AVX2 / portable C++ kernels for every packed format
(``_native`` extension, built by the package's own build, reached through ctypes).

Instruction set: the best the CPU has, or ``ANYBIT_ISA`` = ``avx512`` | ``avx2`` |
``scalar`` (capped at what the CPU has), or :func:`set_isa`. Threads: torch's
(``torch.get_num_threads()``). If the extension is missing or fails to load, anybit warns
once and the dispatch keeps the PyTorch reference kernels.

Each kernel takes the format's packed tensors in a kernel layout prepared once per module
(cached like the reference backend's dequantized weight):
  * ``int`` / ``pot`` / ``potz``: the stored codes as they are; float32 scales (and ``s·z``;
    ``potz``: s/2, so that code m's exponent add of m gives s·2^(m−1));
  * ``bcq``: bit-planes blocked by 16 rows, then by pairs of chunks of 8 inputs,
    ``[N/16, K/16, q, 2, 16]`` bytes; α (float16, as stored) and offsets blocked by 16 rows too;
  * ``bitplane``: planes as 64-bit words blocked by 8 rows, ``[N/8, G, b, W, 8]``, plus
    per-group code sums for the zero-point terms.
Formats or specs a kernel does not cover (BCQ groups not a multiple of 8, INT weights
with quantized activations) run on the reference backend.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from ctypes import c_float, c_int, c_int64, c_void_p

import torch

from ..allocator import drop_file_pages
from ..formats import get_format
from ..formats import int as intfmt
from ..formats import pot as potfmt

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
ISA_NAMES = {v: k for k, v in ISAS.items()}

_lib = None
_load_error: str | None = None


def _load():
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    try:
        spec = importlib.util.find_spec("anybit.kernels._native")
        if spec is None or spec.origin is None:
            raise ImportError("the extension anybit.kernels._native is not built")
        lib = ctypes.CDLL(spec.origin)
        i64, p = c_int64, c_void_p
        lib.anybit_cpu_isa.restype = c_int
        lib.anybit_set_isa.restype = c_int
        lib.anybit_set_isa.argtypes = [c_int]
        lib.anybit_get_isa.restype = c_int
        lib.anybit_int_gemm.argtypes = [p, i64, i64, p, i64, i64, c_int, i64, i64, p, p, p, p, c_int]
        lib.anybit_pot_gemm.argtypes = [p, i64, i64, p, i64, i64, c_int, c_int, i64, i64, p, p, p, c_int, c_int]
        lib.anybit_dequant.argtypes = [c_int, p, i64, i64, i64, c_int, c_int, i64, i64, p, p, p, c_int, c_int, p]
        lib.anybit_bcq_gemm.argtypes = [p, i64, i64, p, i64, i64, c_int, i64, i64, p, p, p, p, c_int]
        lib.anybit_bcq_dequant.argtypes = [p, i64, i64, i64, c_int, i64, i64, p, p, p, c_int]
        lib.anybit_bitplane_gemm.argtypes = [p, i64, i64, p, i64, i64, c_int, c_int, i64, i64, i64, p, p, p, c_int,
                                             c_int, i64, p, p, c_int]
        lib.anybit_has_q8.restype = c_int
        lib.anybit_cpu_vnni.restype = c_int
        lib.anybit_set_bcq_int8.restype = c_int
        lib.anybit_set_bcq_int8.argtypes = [c_int]
        if hasattr(lib, "anybit_set_q8_vnni256"):  # older builds (benchmarks/ab_native.py) lack it
            lib.anybit_set_q8_vnni256.restype = c_int
            lib.anybit_set_q8_vnni256.argtypes = [c_int]
            lib.anybit_set_q8_vnni256(int(Q8_VNNI256_DEFAULT))
        if hasattr(lib, "anybit_set_q8_rows16"):  # older builds (benchmarks/ab_native.py) lack it
            lib.anybit_set_q8_rows16.restype = c_int
            lib.anybit_set_q8_rows16.argtypes = [c_int]
            lib.anybit_set_q8_rows16(int(Q8_ROWS16_DEFAULT))
        if hasattr(lib, "anybit_set_q8_gfni"):  # older builds (benchmarks/ab_native.py) lack it
            lib.anybit_cpu_gfni.restype = c_int
            lib.anybit_set_q8_gfni.restype = c_int
            lib.anybit_set_q8_gfni.argtypes = [c_int]
            lib.anybit_q8_gfni.restype = c_int
            lib.anybit_set_q8_gfni(int(os.environ.get("ANYBIT_Q8_GFNI", "1") != "0"))
        if hasattr(lib, "anybit_set_decode_team"):  # older builds (benchmarks/ab_native.py loads them) lack it
            lib.anybit_set_decode_team.restype = c_int
            lib.anybit_set_decode_team.argtypes = [c_int]
        lib.anybit_int_q8_gemm.argtypes = [p, i64, i64, p, i64, i64, c_int, i64, i64, i64, p, p, p, p, c_int, p]
        lib.anybit_bitplane_q8_gemm.argtypes = [p, i64, i64, p, i64, c_int, i64, c_int, i64, i64, p, p, p, c_int, c_int,
                                                i64, p, p, c_int]
        lib.anybit_rmsnorm.argtypes = [p, p, c_float, p, i64, i64]
        lib.anybit_attn_decode.argtypes = [p, p, p, p, p, i64, i64, p, p, i64, i64, i64, c_float, p, p, c_float, p, p]
        lib.anybit_silu_mul.argtypes = [p, i64, i64, p]
        lib.anybit_decode_layers.argtypes = [p, i64, p, i64, i64, i64, i64, i64, i64, i64, p, p, c_float, p]
        lib.anybit_lin_call.argtypes = [p, p, p]
        if hasattr(lib, "anybit_pot_fake_weight"):  # older builds (benchmarks/ab_native.py loads them) lack them
            lib.anybit_pot_fake_weight.argtypes = [p, p, p, p, p, i64, i64, i64, i64, c_int, c_int, p, p, p, c_int]
            lib.anybit_pot_fake_weight.restype = None
            lib.anybit_fq_backward.argtypes = [p, p, p, p, p, p, i64, i64, c_int, p, p, p, p, p, c_int]
            lib.anybit_fq_backward.restype = None
            lib.anybit_fq_add_extremes.argtypes = [p, p, p, p, p, i64, i64, p, c_int]
            lib.anybit_fq_add_extremes.restype = None
        if hasattr(lib, "anybit_lin_rows"):  # older builds (benchmarks/ab_native.py loads them) lack it
            lib.anybit_lin_rows.argtypes = [p, p, i64, p, c_int]
            lib.anybit_lin_rows.restype = None
        for f in ("anybit_decode_layers", "anybit_rmsnorm", "anybit_attn_decode", "anybit_silu_mul", "anybit_int_gemm", "anybit_pot_gemm", "anybit_dequant", "anybit_bcq_gemm", "anybit_bitplane_gemm",
                  "anybit_int_q8_gemm", "anybit_bitplane_q8_gemm", "anybit_bcq_dequant", "anybit_lin_call"):
            getattr(lib, f).restype = None
        lib.anybit_set_bcq_int8(bcq_mode_from_env())
        env = os.environ.get("ANYBIT_ISA")
        if env:
            if env not in ISAS:
                raise ValueError(f"ANYBIT_ISA={env!r}; choose one of {', '.join(ISAS)}")
            lib.anybit_set_isa(ISAS[env])
        _lib = lib
    except (OSError, ImportError, ValueError) as e:
        _load_error = str(e)
        warnings.warn(f"anybit: native kernels unavailable ({e}); using the PyTorch reference kernels",
                      RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    return _load() is not None


def cpu_isa() -> str:
    """The best instruction set of this CPU that the kernels use."""
    return ISA_NAMES[_load().anybit_cpu_isa()]


def isa() -> str:
    return ISA_NAMES[_load().anybit_get_isa()]


def has_vnni() -> bool:
    """Whether the CPU has AVX-512 VNNI (the int8 kernel then uses vpdpbusd under avx512)."""
    return bool(_load().anybit_cpu_vnni())


def q8_kernel() -> str | None:
    """The int8-activation kernel in use: ``"rows16"`` (AVX-512 VNNI, 16 rows in a register's
    lanes), ``"vnni"`` (AVX-512 VNNI, the 4-row tile), ``"vnni256"`` (the AVX2 kernel and layout
    with 256-bit vpdpbusd), ``"avx2"`` or None (portable)."""
    kinds = {4: "rows16", 3: "vnni256", 2: "vnni", 1: "avx2"}
    return kinds.get(int(_load().anybit_has_q8())) if available() else None


# Where AVX-512 VNNI is in use, which int8 kernel runs INT/PoT layers at load: True the AVX2
# kernel with 256-bit vpdpbusd (kernels_q8.inc, Q8_VNNI), False the 512-bit tile (the default:
# measured 2-20 % faster at batch 1 on AMD Zen 4, docs/kernels.md; ANYBIT_Q8_VNNI=256 picks
# the other; set_q8_vnni256 changes it later). The bit-plane integer-dot kernel follows the
# choice (the 256-bit kernel, or the rows-in-lanes one below).
Q8_VNNI256_DEFAULT = os.environ.get("ANYBIT_Q8_VNNI", "512") == "256"

# Where AVX-512 VNNI is in use (and not the 256-bit kernel), which 512-bit kernel and layout:
# rows in the lanes (kernels_q8_rows16.inc, the default: no per-group fold of a row's lanes) or
# the 4-row tile (ANYBIT_Q8_ROWS16=0, or set_q8_rows16(False); kept for comparisons).
Q8_ROWS16_DEFAULT = os.environ.get("ANYBIT_Q8_ROWS16", "1") != "0"

_isa_gen = 0  # bumped by set_isa and set_q8_*: prepared calls (FastLinear) built before are stale


def set_q8_vnni256(on: bool) -> bool:
    """Choose the int8 kernel where VNNI is in use (see Q8_VNNI256_DEFAULT); returns the
    previous choice. Layouts are cached per kernel, so modules rebuild theirs on their next call."""
    global _isa_gen
    _isa_gen += 1
    return bool(_load().anybit_set_q8_vnni256(int(on)))


def set_q8_rows16(on: bool) -> bool:
    """Choose the 512-bit int8 kernel where VNNI is in use (see Q8_ROWS16_DEFAULT); returns
    the previous choice. Layouts are cached per kernel, so modules rebuild theirs."""
    global _isa_gen
    _isa_gen += 1
    return bool(_load().anybit_set_q8_rows16(int(on)))


def has_gfni() -> bool:
    """Whether the CPU has GFNI (the int8 kernels then move code pieces with gf2p8affineqb)."""
    lib = _load()
    return bool(lib is not None and hasattr(lib, "anybit_cpu_gfni") and lib.anybit_cpu_gfni())


def q8_gfni() -> bool:
    """Whether the int8 kernels in use are the GFNI build (where VNNI is in use and the CPU has
    GFNI, unless ANYBIT_Q8_GFNI=0 or set_q8_gfni(False)): the 4-row tiles move code pieces with
    gf2p8affineqb; the rows-in-lanes kernel only adds its 1-bit pieces by a masked vpaddb."""
    lib = _load()
    return bool(lib is not None and hasattr(lib, "anybit_q8_gfni") and lib.anybit_q8_gfni())


def set_q8_gfni(on: bool) -> bool:
    """Let the int8 kernels use GFNI where the CPU has it (the default) or not (for comparisons
    and tests; the layout is the same); returns the previous setting."""
    global _isa_gen
    _isa_gen += 1
    return bool(_load().anybit_set_q8_gfni(int(on)))


BCQ_MODES = {"float": 0, "vpshufb": 1, "vnni": 2}


def bcq_mode_from_env() -> int:
    """The BCQ LUT-GEMM kernel ANYBIT_BCQ_INT8 asks for: 0 float tables, 1 int8 tables looked up by
    vpshufb, 2 (default) int8 tables looked up four chunks at a time by vpermb and summed by
    vpdpbusd where the CPU has AVX-512 VBMI and VNNI and the groups are multiples of 32 (else 1)."""
    env = os.environ.get("ANYBIT_BCQ_INT8", "2")
    if env not in ("0", "1", "2"):
        raise ValueError(f"ANYBIT_BCQ_INT8={env!r}; choose 0 (float tables), 1 (vpshufb) or 2 (vpermb + vpdpbusd)")
    return int(env)


def set_bcq_mode(mode: str | int) -> int:
    """Choose the BCQ kernel (BCQ_MODES name or number; see bcq_mode_from_env) for comparisons and
    tests; returns the previous mode. The weights' layout is the same for all three."""
    global _bcq_mode
    new = BCQ_MODES[mode] if isinstance(mode, str) else int(mode)
    old = bcq_mode_from_env() if _bcq_mode is None else _bcq_mode
    _bcq_mode = _load().anybit_set_bcq_int8(new)
    return old


_bcq_mode: int | None = None  # as last set (None: as the environment said at load)


def set_isa(name: str) -> str:
    """Use ``name`` (capped at the CPU's best); returns the one in use."""
    global _isa_gen
    _isa_gen += 1
    return ISA_NAMES[_load().anybit_set_isa(ISAS[name])]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# Below this many weight x row products a kernel runs on one thread: forking and joining an
# OpenMP team costs tens of microseconds (far more when the cores are shared), more than
# such a product takes.
PARALLEL_MIN_WORK = 1 << 20


# An elementwise pass over one value counts as this many products for _threads: a pass
# over 64K values (a 576 x 128 block) goes parallel
ELEMENTWISE_WORK = 16


def _threads(work: int = PARALLEL_MIN_WORK) -> int:
    return torch.get_num_threads() if work >= PARALLEL_MIN_WORK else 1


def has_train_kernels() -> bool:
    """Whether the block-training kernels (:func:`pot_fake_weight`, :func:`fq_backward`,
    :func:`fq_add_extremes`; built together) are in this build."""
    lib = _load()
    return lib is not None and hasattr(lib, "anybit_pot_fake_weight")


def pot_fake_weight(log_abs: torch.Tensor, sign: torch.Tensor, s_hat: torch.Tensor, k: int, top: int, zero: bool,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PoTPTQ's training-time weight ``Ŝ · sign · 2^e`` with ``e = clamp(round(log2|w| − log2 Ŝ),
    0, top)`` (0 where ``zero`` and ``log2|w| − log2 Ŝ < −1``) in one native pass: returns
    the levels ``sign · 2^e`` ``[N, G, g]`` (float32) and the weight ``[N, k]`` in ``dtype``
    (float32 or bfloat16), equal bit for bit to the PyTorch expression."""
    n, g, gs = log_abs.shape
    log_abs, sign = log_abs.float().contiguous(), sign.float().contiguous()
    s_hat = s_hat.detach().float().contiguous()
    lr = torch.log2(s_hat.clamp_min(1e-30))
    lz = torch.log2(s_hat)
    levels = torch.empty(n, g, gs, dtype=torch.float32)
    w = torch.empty(n, k, dtype=dtype)
    is16 = dtype == torch.bfloat16
    _lib.anybit_pot_fake_weight(log_abs.data_ptr(), sign.data_ptr(), lr.data_ptr(), lz.data_ptr(), s_hat.data_ptr(),
                                n, g, gs, k, int(top), int(zero), levels.data_ptr(),
                                None if is16 else w.data_ptr(), w.data_ptr() if is16 else None,
                                _threads(ELEMENTWISE_WORK * n * g * gs))
    return levels, w


def fq_backward(x: torch.Tensor, gy: torch.Tensor, s: torch.Tensor, z: torch.Tensor, xmax: torch.Tensor,
                xmin: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """One pass of the backward of ``y = (clamp(round(x/s) + z, 0, top) − z)·s`` (straight-
    through rounding) over ``x`` and ``gy`` ``[groups, g]`` with per-group ``s, z, xmax, xmin``
    ``[groups]``: the gradient where the code is not clamped ``gx`` (0 where it is), and per
    group ``Σ gy·(c − z) − Σ gx·x/s`` (the scale's direct term), ``Σ (gy − gx)`` (the clamped
    part) and the counts of entries equal to the max and to the min. float32."""
    groups, g = x.shape
    x, gy = x.float().contiguous(), gy.float().contiguous()
    s, z, xmax, xmin = (t.float().contiguous() for t in (s, z, xmax, xmin))
    gx = torch.empty_like(x)
    ds, gzp, nmax, nmin = (torch.empty(groups) for _ in range(4))
    _lib.anybit_fq_backward(x.data_ptr(), gy.data_ptr(), s.data_ptr(), z.data_ptr(), xmax.data_ptr(),
                            xmin.data_ptr(), groups, g, int(top), gx.data_ptr(), ds.data_ptr(), gzp.data_ptr(),
                            nmax.data_ptr(), nmin.data_ptr(), _threads(ELEMENTWISE_WORK * x.numel()))
    return gx, ds, gzp, nmax, nmin


def fq_add_extremes(gx: torch.Tensor, x: torch.Tensor, xmax: torch.Tensor, xmin: torch.Tensor,
                    add_max: torch.Tensor, add_min: torch.Tensor) -> None:
    """In place: ``gx += add_max`` where ``x`` equals its group's max, ``+= add_min`` where it
    equals the min (``gx`` from :func:`fq_backward`, the others as there)."""
    groups, g = x.shape
    x = x.float().contiguous()
    xmax, xmin, add_max, add_min = (t.float().contiguous() for t in (xmax, xmin, add_max, add_min))
    _lib.anybit_fq_add_extremes(x.data_ptr(), xmax.data_ptr(), xmin.data_ptr(), add_max.data_ptr(),
                                add_min.data_ptr(), groups, g, gx.data_ptr(), _threads(ELEMENTWISE_WORK * x.numel()))


def _group(spec, k: int) -> tuple[int, int]:
    g = k if spec.group_size == -1 else spec.group_size
    return g, -(-k // g)


def _cached(module, build):
    """The kernel layout ``build`` makes of ``module``'s packed tensors, rebuilt when they
    change (one entry per layout: a module can serve the int8 kernel in decoding and the
    dequantize kernel in prefill)."""
    # the int8 kernel in use is part of the key: layouts differ between VNNI and AVX2
    key = (module.packed_key(), _lib.anybit_has_q8())
    cached = getattr(module, "_native_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, {})
        module._native_cache = cached
    layouts = cached[1]
    if build not in layouts:
        layouts[build] = built = build(module)
        if build in _OWN_COPY:
            # the kernel reads its own copy: the checkpoint's pages of the packed tensors need
            # not stay resident next to it (peak RSS ~ one copy of the weights, not two)
            _drop_unkept_pages([module], built.values())
    return layouts[build]


def _drop_unkept_pages(modules: list, kept) -> None:
    """Drop the file pages of ``modules``' packed tensors except those whose storage one of the
    ``kept`` objects (the layout a kernel reads; non-tensors ignored) shares: the kernel reads its own copy."""
    keep = {t.untyped_storage().data_ptr() for t in kept if isinstance(t, torch.Tensor)}
    drop_file_pages(t for m in modules for t in m.packed().values() if t.untyped_storage().data_ptr() not in keep)


def _own_copy(build):
    """Mark a layout builder whose result holds every byte its kernel reads (see _cached)."""
    _OWN_COPY.add(build)
    return build


_OWN_COPY: set = set()


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).to(torch.float32).contiguous()


# Above this many activation rows (prefill, evaluation, calibration), a GEMM is compute-bound
# and a dequantized weight with BLAS is faster; the native kernels serve decoding and small
# batches, where reading the packed weight is the cost. The bit-plane GEMM's work grows with
# every row (one AND+popcount pass per row), so it hands over earlier. ANYBIT_NATIVE_MAX_ROWS
# overrides both (``anybit bench kernels`` raises them to time the kernels themselves).
MAX_ROWS = int(os.environ.get("ANYBIT_NATIVE_MAX_ROWS", "16"))
MAX_ROWS_BITPLANE = int(os.environ.get("ANYBIT_NATIVE_MAX_ROWS", "8"))

# PoT: the exponent add once per group into a 16-entry table held in a register, one permute
# per weight (AVX-512); False: the exponent add on every weight. ANYBIT_POT_TABLE=0 turns it off.
POT_TABLE = os.environ.get("ANYBIT_POT_TABLE", "1") != "0"


def _too_many_rows(x: torch.Tensor, k: int, limit: int | None = None) -> bool:
    return x.numel() // k > (MAX_ROWS if limit is None else limit)


def _bias(module):
    return None if module.bias is None else module.bias.detach().float().contiguous()


# ------------------------------------------------------------------------------- INT, PoT

def _prep_int(module):
    codes, scales, zeros = intfmt.IntFormat().unpack(module.packed(), module.spec, module.shape)
    del codes
    return {"qweight": module.qweight.contiguous(), "scales": scales.contiguous(),
            "szs": (scales * zeros).contiguous(), "bias": _bias(module)}


def _prep_pot(module):
    # float32 scales; their bit patterns receive the exponent add (potz: of m for s/2·2^m)
    scales = module.scales.float() * (0.5 if potfmt.has_zero(module.spec) else 1.0)
    return {"qweight": module.qweight.contiguous(), "scales": scales.contiguous(), "bias": _bias(module)}


# INT weights at batch <= MAX_ROWS: int8 activations per block and integer dot products
# (kernels_q8.inc: AVX-512 VNNI, or AVX2 vpmaddubsw), as llama.cpp runs Q4_0; where the
# group size is a multiple of 64 (or per channel). The activations' rounding (int8 per block of
# 128 or the group) is the only difference from the float kernel; ANYBIT_INT_ACT8=0 keeps
# float activations. Prefill and evaluation (more rows) dequantize and use BLAS, unchanged.
INT_ACT8 = os.environ.get("ANYBIT_INT_ACT8", "1") != "0"
Q8_PIECES = {8: ((8, 0),), 7: ((4, 0), (2, 4), (1, 6)), 6: ((4, 0), (2, 4)), 5: ((4, 0), (1, 4)), 4: ((4, 0),),
             3: ((2, 0), (1, 2)), 2: ((2, 0),)}


def q8_block(spec, k: int) -> int | None:
    """The activation block of the int8 kernel for this layer, or None if it does not apply:
    128 or the group (a multiple of 64); 32 for groups that are a multiple of 32, on the kernel
    of the AVX2 layout (the 512-bit VNNI tile works on 64-code chunks; where it is in use such
    layers run the AVX2 layout's kernel with 256-bit VNNI)."""
    g = k if spec.group_size == -1 else spec.group_size
    if spec.group_size == -1 or g % 128 == 0:
        return 128
    if g % 64 == 0:
        return g
    return 32 if g % 32 == 0 and q8_kernel() is not None else None


def _pot_level_list(spec) -> list[int]:
    """The integer level of each PoT code (times the group scale)."""
    b = spec.bits
    levels = []
    for c in range(1 << b):
        e, neg = c & ((1 << (b - 1)) - 1), c >> (b - 1)
        mag = (0 if e == 0 else 1 << (e - 1)) if potfmt.has_zero(spec) else 1 << e
        levels.append(-mag if neg else mag)
    return levels


def pot_levels(spec) -> tuple[list[int], int] | None:
    """PoT codes as integer levels (times the group scale) and the offset Z that makes them
    unsigned bytes, or None if a level does not fit (pot W4: ±128)."""
    levels = _pot_level_list(spec)
    z = max(abs(v) for v in levels)
    return (levels, z) if 2 * z <= 255 else None


def pot_halves(spec) -> tuple[tuple[list[int], list[int]], int] | None:
    """Where the levels do not fit one byte table (plain pot W4: ±1..±128), two tables whose
    levels add up to each code's level, each within ±64 (±128 = ±64 ± 64), and their Z (64
    each): the int8 kernel dots both with the same codes (exact: the same integer products,
    split), in one pass on the 512-bit VNNI tile, one pass per table elsewhere. None where one
    table fits or the levels are wider."""
    if spec.format not in ("pot", "potz") or pot_levels(spec) is not None:
        return None
    levels = _pot_level_list(spec)
    first = [v if abs(v) <= 64 else v // 2 for v in levels]
    second = [v - a for v, a in zip(levels, first)]
    return ((first, second), 64) if max(abs(v) for v in first + second) <= 64 else None


def _q8_usable(module) -> bool:
    spec = module.spec
    if not INT_ACT8 or module.act.enabled or q8_block(spec, module.in_features) is None:
        return False
    if spec.format == "int":
        ok = 2 <= spec.bits <= 8
    else:
        ok = spec.format in ("pot", "potz") and (pot_levels(spec) is not None or pot_halves(spec) is not None)
    return ok and bool(_lib.anybit_has_q8())


Q8_ROWS = 4  # rows per block of the layout (kernels_q8.inc: R)


def q8_layout(codes: torch.Tensor, bits: int, masks: bool = False) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` in the piece layout of kernels_q8.inc: blocks of 4 rows,
    ``uint8 [ceil(N/4), 4·row_bytes]``, in groups of P chunks (q8_group_chunks) that hold
    each piece's units in turn, interleaved row by row; 1-bit pieces as 64-bit masks
    (``masks``: the AVX-512 VNNI kernel) or in 64-byte lines of 8 chunks (the AVX2 kernel).
    Built in slices of rows so that the int32 temporaries stay small (a 49152-row head would
    take several 100+ MB ones at once)."""
    step = Q8_ROWS * max(1, (1 << 20) // max(codes.shape[1], 1))
    if codes.shape[0] > step:
        return torch.cat([_q8_layout(codes[i: i + step], bits, masks) for i in range(0, codes.shape[0], step)], 0)
    return _q8_layout(codes, bits, masks)


def _q8_masks(spec, k: int) -> bool:
    """Whether the int8 kernel that runs this layer reads 1-bit pieces as masks (the 512-bit
    VNNI kernels; blocks of 32 go to the AVX2 layout's kernel there, with 256-bit VNNI)."""
    return q8_kernel() in ("vnni", "rows16") and q8_block(spec, k) % 64 == 0


def q8_block_rows(spec, k: int) -> int:
    """Rows per block of the int8 kernel's layout for this layer: 16 for the rows-in-lanes
    kernel (q8_layout_rows16), else 4 (q8_layout)."""
    return Q8_RL if q8_kernel() == "rows16" and q8_block(spec, k) % 64 == 0 else Q8_ROWS


Q8_RL = 16  # rows per block of the rows-in-lanes layout (kernels_q8_rows16.inc: RL)


def q8_layout_rows16(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` in the layout of kernels_q8_rows16.inc: blocks of 16 rows
    (``uint8 [ceil(N/16), block bytes]``), a block's chunk q holding codes 4q..4q+3 of its 16
    rows ([row][4]); each block stored as one row of the piece layout (q8_layout), 1-bit pieces
    in lines of 8 chunks, a group's narrowest piece first (64-bit masks in the pieces' order for
    builds of layout version 1: :func:`q8_rl_layout`)."""
    masks = q8_rl_layout() < 2
    n, k = codes.shape
    kp = -(-k // 64) * 64
    step = Q8_RL * max(1, (1 << 20) // max(kp, 1))
    out = []
    for i in range(0, max(n, 1), step):
        part = codes[i: i + step]
        nb = -(-part.shape[0] // Q8_RL)
        part = torch.nn.functional.pad(part, (0, kp - k, 0, nb * Q8_RL - part.shape[0]))
        part = part.view(nb, Q8_RL, kp // 4, 4).permute(0, 2, 1, 3).reshape(nb, kp * Q8_RL)
        out.append(_q8_layout(part, bits, masks=masks, rows=1, narrow_first=not masks))
    return torch.cat(out, 0).contiguous() if len(out) > 1 else out[0]


def q8_rl_layout() -> int:
    """The version of the rows16 layout the loaded build reads (anybit_q8_rl_layout): 3 = as 2,
    the bit-plane U term only for activations with zero points per weight group (per token: one
    float32 per row; symmetric per group: none); 2 = 1-bit pieces in lines, float16 scales and
    uint8 zero points (bit-plane: and int32 U − cnt·a per group); 1 (older builds, loaded by
    benchmarks/ab_native.py) = 1-bit masks, float32 values."""
    return int(_lib.anybit_q8_rl_layout()) if hasattr(_lib, "anybit_q8_rl_layout") else 1


def q8_rows16_values(v: torch.Tensor) -> torch.Tensor:
    """Per-(row, group) values ``[N, G]`` (scales, zero points, s·z, in their dtype) as the rows16
    kernel reads them: per block of 16 rows, ``[G][16]`` (rows past N zero)."""
    n, g = v.shape
    nb = -(-n // Q8_RL)
    v = torch.nn.functional.pad(v, (0, 0, 0, nb * Q8_RL - n))
    return v.view(nb, Q8_RL, g).transpose(1, 2).contiguous().view(nb * g, Q8_RL)


def _q8_unit_chunks(width: int, masks: bool) -> int:
    """Chunks (of 64 codes) one unit of a ``width``-bit piece holds: a 64-byte line holds 8/width,
    a chunk of 8-bit codes or a 64-bit mask (``masks``) one."""
    return 1 if width == 8 or (width == 1 and masks) else 8 // width


def q8_group_chunks(bits: int, masks: bool) -> int:
    """Chunks per group of the piece layout: the most that one unit of a piece holds. A group
    holds all pieces of its chunks, so that the kernel reads one sequential stream per block of
    rows: with a stream per piece, 3- and 5-bit rows ran at 1/3 of the cold read bandwidth of
    4-bit ones (docs/kernels.md)."""
    return max(_q8_unit_chunks(w, masks) for w, _ in Q8_PIECES[bits])


def _q8_layout(codes: torch.Tensor, bits: int, masks: bool, rows: int = Q8_ROWS,
               narrow_first: bool = False) -> torch.Tensor:
    """See :func:`q8_layout`; ``narrow_first``: a group's pieces by width, narrowest first
    (the rows16 layout: each chunk's loads then go forward through the group)."""
    n, k = codes.shape
    c = -(-k // 64)
    nb = -(-n // rows)
    codes = torch.nn.functional.pad(codes, (0, c * 64 - k, 0, nb * rows - n)).view(nb, rows, c, 64)
    P = q8_group_chunks(bits, masks)
    full = -(-c // P) - 1  # groups of P chunks before the last (which may be shorter)
    parts_full, parts_last = [], []
    for width, shift in sorted(Q8_PIECES[bits]) if narrow_first else Q8_PIECES[bits]:
        v = (codes >> shift) & ((1 << width) - 1)  # [blocks, R, C, 64]
        if width == 8:
            units = v  # unit = a chunk of 64 bytes
        elif width == 1 and masks:
            bits8 = v.view(nb, rows, c, 8, 8).to(torch.int32)  # [.., chunk, byte i, bit t] = code 8i + t
            units = (bits8 << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)  # [.., C, 8]
        else:
            per = 8 // width
            cl = -(-c // per) * per
            v = torch.nn.functional.pad(v, (0, 0, 0, cl - c)).view(nb, rows, cl // per, per, 64).to(torch.int32)
            shifts = (torch.arange(per, dtype=torch.int32) * width).view(1, 1, 1, per, 1)
            units = (v << shifts).sum(3).to(torch.uint8)  # [.., lines, 64]
        per_group = P // _q8_unit_chunks(width, masks)  # units of a full group
        head = units[:, :, : full * per_group]  # [blocks, R, full·upg, unit bytes]
        head = head.reshape(nb, rows, full, per_group, units.shape[3]).permute(0, 2, 3, 1, 4)  # unit u of row r at u·R + r
        parts_full.append(head.reshape(nb, full, per_group * rows * units.shape[3]))
        parts_last.append(units[:, :, full * per_group:].transpose(1, 2).reshape(nb, -1))
    return torch.cat([torch.cat(parts_full, 2).reshape(nb, -1)] + parts_last, 1).contiguous()


@_own_copy
def _prep_int_q8(module):
    """The int8 kernel's layout of an INT/PoT module: ``w`` (codes), ``rows`` (per block),
    ``scales`` and ``szs`` (float32 s and s·z per row and group; for the rows16 layout, version 2,
    float16 s and uint8 zero points z, per block [G][16]), ``bias``, ``table`` (PoT)."""
    spec = module.spec
    if spec.format == "int":
        codes, scales, zeros = intfmt.IntFormat().unpack(module.packed(), spec, module.shape)
        table = None
    else:  # PoT: codes -> level + Z through the kernel's byte table; Z is the zero point
        codes, s16 = get_format(spec.format).unpack(module.packed(), spec, module.shape)
        fit = pot_levels(spec)
        tables, z = ([fit[0]], fit[1]) if fit is not None else pot_halves(spec)
        scales = s16.float()
        zeros = torch.full_like(scales, float(z * len(tables)))  # the tables' zero points add up
        # 32 bytes: the table, then the second table of pot_halves or zeros (anybit_int_q8_gemm)
        table = torch.zeros(32, dtype=torch.uint8)
        for i, t in enumerate(tables):
            table[16 * i:16 * i + len(t)] = torch.tensor([v + z for v in t], dtype=torch.uint8)
        # the kernel sums <= 3-bit PoT products in int16 over 3 chunks (LUT_MAX_3BIT)
        assert spec.bits > 3 or int(table.max()) <= 16
    rows = q8_block_rows(spec, module.in_features)
    if rows != Q8_RL:
        w, szs = q8_layout(codes, spec.bits, _q8_masks(spec, module.in_features)), scales * zeros
    elif q8_rl_layout() >= 2:
        # float16 scales and uint8 zero points, the kernel forms s·z (the same float32 product):
        # 3 bytes per row and group to read instead of 8
        assert int(zeros.max()) <= 255 and torch.equal(scales.half().float(), scales)
        w, scales, szs = (q8_layout_rows16(codes, spec.bits), q8_rows16_values(scales.half()),
                          q8_rows16_values(zeros.to(torch.uint8)))
    else:  # version 1: float32 s and s·z
        w, scales, szs = (q8_layout_rows16(codes, spec.bits), q8_rows16_values(scales),
                          q8_rows16_values(scales * zeros))
    return {"w": w, "rows": rows, "scales": scales.contiguous(), "szs": szs.contiguous(), "bias": _bias(module),
            "table": table}


def _q8_args(spec, k: int, n: int, d: dict) -> tuple:
    """The int8 kernel's arguments after the activations and their row count, up to the bias
    (``anybit_int_q8_gemm``'s order), for the layout ``d`` (_prep_int_q8's keys) of ``n`` rows."""
    g, ng = _group(spec, k)
    return (k, _ptr(d["w"]), d["w"].shape[1] // d["rows"], n, spec.bits, g, ng, q8_block(spec, k), _ptr(d["scales"]),
            _ptr(d["szs"]), _ptr(d["bias"]))


def _int_q8(x: torch.Tensor, module) -> torch.Tensor:
    d = _cached(module, _prep_int_q8)
    n, k = module.shape
    xf = _flat(x, k)
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    threads = _threads(xf.shape[0] * n * k)
    args = _q8_args(module.spec, k, n, d)
    _lib.anybit_int_q8_gemm(_ptr(xf), xf.shape[0], *args, _ptr(y), threads, _ptr(d["table"]))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _dequantized_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Many rows: the native dequantize kernel into the shared scratch weight, then BLAS
    (no float copy of each weight stays in memory, unlike the reference backend's cache)."""
    w = dequantize(module, out=_scratch_weight(*module.shape))
    return torch.nn.functional.linear(x, w.to(x.dtype), module.bias)


# The int8 kernel's cost grows with the rows like a GEMV's; measured on SmolLM2's shapes
# (2 threads) it is faster than dequantize + fp32 BLAS up to ~128 rows and slower beyond,
# so short prompts take it too. ANYBIT_Q8_MAX_ROWS overrides.
Q8_MAX_ROWS = int(os.environ.get("ANYBIT_Q8_MAX_ROWS", "128"))


def q8_rows() -> int:
    """The most activation rows the int8 kernel takes (the other kernels' limit if larger)."""
    return max(MAX_ROWS, Q8_MAX_ROWS)


def _weight_only(x: torch.Tensor, module, pot: bool) -> torch.Tensor:
    """INT or PoT weights, float activations: the GEMV/GEMM kernel, or dequantize + BLAS."""
    if _q8_usable(module) and not _too_many_rows(x, module.in_features, q8_rows()):
        return _int_q8(x, module)
    if _too_many_rows(x, module.in_features):
        return _dequantized_linear(x, module)
    d = _cached(module, _prep_pot if pot else _prep_int)
    n, k = module.shape
    g, ng = _group(module.spec, k)
    xf = _flat(x, k)
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    head = (_ptr(xf), xf.shape[0], k, _ptr(d["qweight"]), d["qweight"].shape[1], n, module.spec.bits)
    tail = (g, ng, _ptr(d["scales"]))
    threads = _threads(xf.shape[0] * n * k)
    if pot:
        _lib.anybit_pot_gemm(*head, int(potfmt.has_zero(module.spec)), *tail, _ptr(d["bias"]), _ptr(y), threads,
                             int(POT_TABLE))
    else:
        _lib.anybit_int_gemm(*head, *tail, _ptr(d["szs"]), _ptr(d["bias"]), _ptr(y), threads)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# The kernels below are reached only through kernels.linear, after their predicate in
# KERNELS (bottom) has accepted the call: they do not check it again.

def int_linear(x: torch.Tensor, module) -> torch.Tensor:
    return _weight_only(x, module, pot=False)


def pot_linear(x: torch.Tensor, module) -> torch.Tensor:
    return _weight_only(x, module, pot=True)


_scratch = torch.empty(0)


def _scratch_weight(n: int, k: int) -> torch.Tensor:
    """One float32 buffer shared by every layer (grown to the largest): dequantizing into
    memory that is already mapped avoids a page fault per 4 KiB on every call."""
    global _scratch
    if _scratch.numel() < n * k:
        _scratch = torch.empty(n * k, dtype=torch.float32)
    return _scratch[: n * k].view(n, k)


def dequantize(module, scratch_only: bool = False, pot_table: bool | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor | float:
    """The dequantize-only kernel of a QuantLinear (INT: ``(q − z)·s``; PoT: the exponent add,
    per weight or, with ``pot_table``, once per group into a 16-entry register table): the
    float32 weight, or with ``scratch_only`` a checksum of rows dequantized into cache."""
    fmt = module.spec.format
    table = POT_TABLE if pot_table is None else pot_table
    if fmt not in ("int", "pot", "potz"):
        raise ValueError(f"no dequantize kernel for format {fmt}")
    d = _cached(module, _prep_int if fmt == "int" else _prep_pot)
    n, k = module.shape
    g, ng = _group(module.spec, k)
    if out is None and not scratch_only:
        out = torch.empty(n, k, dtype=torch.float32)
    chk = c_float(0.0)
    _lib.anybit_dequant(0 if fmt == "int" else 2 if table else 1, _ptr(d["qweight"]), d["qweight"].shape[1], n, k,
                        module.spec.bits, int(potfmt.has_zero(module.spec)), g,
                        ng, _ptr(d["scales"]), _ptr(d.get("szs")), _ptr(out), int(scratch_only), _threads(n * k),
                        ctypes.byref(chk))
    return chk.value if scratch_only else out


# ------------------------------------------------------------------------------------ BCQ

def _pad_rows(t: torch.Tensor, npad: int, dim: int) -> torch.Tensor:
    pad = npad - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim)


@_own_copy
def _prep_bcq(module):
    n, k = module.shape
    q = module.spec.bits
    npad = -(-n // 16) * 16
    planes = _pad_rows(module.planes, npad, 1)  # [q, Npad, chunks] bytes
    chunks = planes.shape[2]
    if chunks % 2:  # a zero chunk: pairs of chunks (below)
        planes = torch.cat([planes, torch.zeros(q, npad, 1, dtype=planes.dtype)], 2)
    # blocks of 16 rows, in a block pairs of chunks, in a pair every plane: [Npad/16, chunks/2, q, 2, 16]
    # (kernels_impl.inc, bcq_at: one sequential stream per block of rows)
    planes_b = planes.reshape(q, npad // 16, 16, -1, 2).permute(1, 3, 0, 4, 2).contiguous()
    # α as the format stores it (float16, exact) where the build reads that (bcq_layout 2)
    alpha = _pad_rows(module.alpha.to(torch.float16 if bcq_layout() >= 2 else torch.float32), npad, 0)  # [Npad, G, q]
    ng = alpha.shape[1]
    # blocks of 16 rows too: [Npad/16, G, q, 16] and [Npad/16, G, 16]
    alpha_t = alpha.reshape(npad // 16, 16, ng, q).permute(0, 2, 3, 1).contiguous()
    offset_t = _pad_rows(module.offset.float(), npad, 0).reshape(npad // 16, 16, ng).permute(0, 2, 1).contiguous()
    return {"planes": planes_b, "alpha": alpha_t, "offset": offset_t, "npad": npad, "bias": _bias(module)}


def bcq_layout() -> int:
    """The version of the BCQ coefficient layout the loaded build reads (anybit_bcq_layout): 2 = α
    float16, 1 (older builds, loaded by benchmarks/ab_native.py) = α float32."""
    return int(_lib.anybit_bcq_layout()) if hasattr(_lib, "anybit_bcq_layout") else 1


def bcq_supported(module) -> bool:
    g = module.spec.group_size
    return not module.act.enabled and (g == -1 or g % 8 == 0)


def bcq_dequantize(module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight of a BCQ QuantLinear (the table-lookup kernel), into ``out`` if given."""
    n, k = module.shape
    g, ng = _group(module.spec, k)
    planes = module.planes.contiguous()
    alpha, offset = module.alpha.float().contiguous(), module.offset.float().contiguous()
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    _lib.anybit_bcq_dequant(_ptr(planes), planes.shape[2], n, k, module.spec.bits, g, ng, _ptr(alpha), _ptr(offset),
                            _ptr(out), _threads(n * k))
    return out


# The LUT-GEMM runs every row of a call against one row slice at a time (the slice's plane
# bytes stay in cache). Measured with benchmarks/prefill_split.py (2 threads, AVX2 int8
# tables): faster than dequantize + fp32 BLAS at 128 rows on every SmolLM2 shape (192x576
# even) and at 256 rows on the fused Q/K/V and gate/up shapes, 576x1536 and 4096x4096; 2-15 %
# slower at 256 rows on 576x576 and 192x576. The limit is the int8 INT kernel's (128): its
# int8 tables round like int8 activations, and evaluations of 256-token windows (stories260K)
# stay on the exact dequantize + BLAS path, as INT's do. ANYBIT_BCQ_MAX_ROWS overrides.
BCQ_MAX_ROWS = int(os.environ.get("ANYBIT_BCQ_MAX_ROWS", os.environ.get("ANYBIT_NATIVE_MAX_ROWS", "128")))


def bcq_linear(x: torch.Tensor, module) -> torch.Tensor:
    if _too_many_rows(x, module.in_features, BCQ_MAX_ROWS):  # dequantize into the scratch weight + BLAS
        w = bcq_dequantize(module, out=_scratch_weight(*module.shape))
        return torch.nn.functional.linear(x, w.to(x.dtype), module.bias)
    d = _cached(module, _prep_bcq)
    n, k = module.shape
    g, ng = _group(module.spec, k)
    xf = _flat(x, k)
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    _lib.anybit_bcq_gemm(_ptr(xf), xf.shape[0], k, _ptr(d["planes"]), d["npad"], n, module.spec.bits, g, ng,
                         _ptr(d["alpha"]), _ptr(d["offset"]), _ptr(d["bias"]), _ptr(y), _threads(xf.shape[0] * n * k))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# ------------------------------------------------------------------------------- bit-plane

@_own_copy
def _prep_bitplane(module):
    spec = module.spec
    n, k = module.shape
    g, ng = _group(spec, k)
    planes = module.planes  # [b, N, G, 8W] bytes
    w = planes.shape[-1] // 8
    npad = -(-n // 8) * 8
    planes = planes.contiguous()
    if planes.storage_offset() % 8:  # a byte view into a memory-mapped file: realign before reading as words
        planes = planes.clone()
    words = planes.view(torch.int64).reshape(spec.bits, n, ng, w)
    words = _pad_rows(words, npad, 1)  # [b, Npad, G, W]
    # blocks of 8 rows: [Npad/8, G, b, W, 8]
    wplanes = words.reshape(spec.bits, npad // 8, 8, ng, w).permute(1, 3, 0, 4, 2).contiguous()
    codes, scales, zeros = get_format("bitplane").unpack(module.packed(), spec, module.shape)
    if spec.sym:  # signed values (unpack gives the INT format's offset-binary codes)
        vals = codes.to(torch.int64) - (1 << (spec.bits - 1))
        zw = None
    else:
        vals = codes.to(torch.int64)
        zw = zeros.contiguous()
    padded = torch.nn.functional.pad(vals, (0, ng * g - k)).reshape(n, ng, g)
    return {"wplanes": wplanes, "npad": npad, "W": w, "sw": scales.contiguous(), "zw": zw,
            "wsum": padded.sum(-1).contiguous(), "bias": _bias(module)}


# Bit-plane WxAy as integer dot products: where AVX-512 VNNI is in use, the rows-in-lanes kernel
# of the INT layers (kernels_q8_rows16.inc, bitplane_rows16: 512-bit vpdpbusd, 16 rows per
# register), else on AVX2 (no VPOPCNTDQ: an AND+popcount per weight-plane x activation-plane
# pair would be a scalar popcount) or with the 256-bit VNNI kernel (ANYBIT_Q8_VNNI=256 or
# ANYBIT_Q8_ROWS16=0) the AVX2 piece layout (kernels_q8.inc, bitplane_gemm): one instruction
# per 32 or 64 codes instead of wbits x abits popcounts. Needs groups that are a multiple of 64,
# or per-channel weights (K < 65793: the int32 sums of a whole row stay exact).
# The same integers as AND+popcount, so the same outputs up to float summation order.
# ANYBIT_BITPLANE_DOTS=0 keeps the AND+popcount kernel everywhere.
BITPLANE_DOTS = os.environ.get("ANYBIT_BITPLANE_DOTS", "1") != "0"


def bitplane_dots(module) -> bool:
    """Whether this bit-plane module runs on the integer-dot kernel here."""
    spec, act = module.spec, module.act
    g, ng = _group(spec, module.in_features)
    name = isa()
    here = name == "avx2" or name == "avx512" and has_vnni()
    return (BITPLANE_DOTS and here and 2 <= spec.bits <= 8 and act.bits <= 8
            and (ng == 1 and module.in_features <= 65792 or g % 64 == 0))


def bitplane_block_rows() -> int:
    """Rows per block of the bit-plane integer-dot kernel's layout here: 16 for the rows-in-lanes
    kernel (bitplane_rows16), else 4 (the AVX2 piece layout of bitplane_gemm)."""
    return Q8_RL if q8_kernel() == "rows16" else Q8_ROWS


@_own_copy
def _prep_bitplane_dots(module):
    spec = module.spec
    n, k = module.shape
    g, ng = _group(spec, k)
    codes, scales, zeros = get_format("bitplane").unpack(module.packed(), spec, module.shape)
    u = torch.nn.functional.pad(codes.to(torch.int64), (0, ng * g - k)).reshape(n, ng, g).sum(-1).double()
    sw, a = scales.double(), zeros.double()
    if bitplane_block_rows() == Q8_RL:
        d = (u - (torch.clamp(k - torch.arange(ng) * g, max=g)).double() * a).round()  # U − cnt·a
        if q8_rl_layout() >= 2:
            # per block [G][16]: float16 sw and uint8 a (bitplane_rows16 forms sw·a, version 1's
            # float32 product), and the U − cnt·a term as bitplane_rows16 reads it
            assert torch.equal(sw.half().double(), sw) and int(a.max()) <= 255 and float(d.abs().max()) < 2 ** 24
            values = {"sw": scales.half(), "aw": zeros.to(torch.uint8), "U": d.to(torch.int32)}
            if q8_rl_layout() >= 3 and module.act.group_size == -1:
                # per-token activations: the row's Σ_g sw·(U − cnt·a) (its dequantized weights' sum),
                # one float32 per row, taken once per token instead of per group
                values["U"] = (sw * d).sum(1, keepdim=True).float()
            elif q8_rl_layout() >= 3 and module.act.sym:  # symmetric per group: no zero point, no term
                values["U"] = torch.zeros(n, 0)
        else:  # version 1: float32 sw, sw·a and sw·(U − cnt·a)
            values = {"sw": sw.float(), "aw": (sw * a).float(), "U": (sw * d).float()}
        return {"w": q8_layout_rows16(codes.to(torch.uint8), spec.bits), "rows": Q8_RL,
                **{key: q8_rows16_values(v) for key, v in values.items()}, "bias": _bias(module)}
    return {"w": q8_layout(codes.to(torch.uint8), spec.bits, masks=False), "rows": Q8_ROWS,  # the AVX2 layout
            "sw": scales.contiguous(), "aw": zeros.float().contiguous(), "U": u.float().contiguous(),
            "bias": _bias(module)}


def _bitplane_dots_linear(x: torch.Tensor, module) -> torch.Tensor:
    act, spec = module.act, module.spec
    n, k = module.shape
    g, ng = _group(spec, k)
    d = _cached(module, _prep_bitplane_dots)
    xf = _flat(x, k)
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    _lib.anybit_bitplane_q8_gemm(_ptr(xf), xf.shape[0], k, _ptr(d["w"]), d["w"].shape[1] // d["rows"], d["rows"], n,
                                 spec.bits, g, ng, _ptr(d["sw"]), _ptr(d["aw"]), _ptr(d["U"]), act.bits,
                                 int(not act.sym), -1 if act.group_size == -1 else g, _ptr(d["bias"]), _ptr(y),
                                 _threads(xf.shape[0] * n * k))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def bitplane_supported(module) -> bool:
    """The AND+popcount kernel needs quantized activations, per token or in the weights' groups."""
    act = module.act
    return act.enabled and act.group_size in (-1, _group(module.spec, module.in_features)[0])


def bitplane_linear(x: torch.Tensor, module) -> torch.Tensor:
    if bitplane_dots(module):
        return _bitplane_dots_linear(x, module)
    act = module.act
    spec = module.spec
    n, k = module.shape
    g, ng = _group(spec, k)
    d = _cached(module, _prep_bitplane)
    agroup = -1 if act.group_size == -1 else g
    xf = _flat(x, k)
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    _lib.anybit_bitplane_gemm(_ptr(xf), xf.shape[0], k, _ptr(d["wplanes"]), d["npad"], n, spec.bits, int(spec.sym), g, ng,
                              d["W"], _ptr(d["sw"]), _ptr(d["zw"]), _ptr(d["wsum"]), act.bits, int(not act.sym), agroup,
                              _ptr(d["bias"]), _ptr(y), _threads(xf.shape[0] * n * k))
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _on_cpu(x: torch.Tensor) -> bool:
    """The C kernels read float CPU memory (any float dtype; _flat converts to float32)."""
    return x.device.type == "cpu" and x.is_floating_point()


def weight_only_supported(x: torch.Tensor, module) -> bool:
    """INT / PoT kernels: float activations (quantized ones are the bit-plane format's job)."""
    return _on_cpu(x) and not module.act.enabled


def bcq_call_supported(x: torch.Tensor, module) -> bool:
    return _on_cpu(x) and bcq_supported(module)  # many rows: bcq_dequantize + BLAS


def bitplane_call_supported(x: torch.Tensor, module) -> bool:
    # the integer-dot kernel costs what the INT int8 GEMM costs, so it takes the prompts that
    # one takes (and the reference's float copy of the weight stays out of memory)
    limit = q8_rows() if bitplane_supported(module) and bitplane_dots(module) else MAX_ROWS_BITPLANE
    return _on_cpu(x) and bitplane_supported(module) and not _too_many_rows(x, module.in_features, limit)


# format -> (kernel, whether it runs a call); kernels/__init__.py asks the second first
KERNELS = {"int": (int_linear, weight_only_supported), "pot": (pot_linear, weight_only_supported),
           "potz": (pot_linear, weight_only_supported), "bcq": (bcq_linear, bcq_call_supported),
           "bcq16": (bcq_linear, bcq_call_supported), "bitplane": (bitplane_linear, bitplane_call_supported)}


# ------------------------------------------------------------------------ decoding plans

def _fused_bias(parts: list, sizes: list[int]) -> torch.Tensor | None:
    """The biases of fused linears concatenated along N (zeros for those without), or None."""
    if all(p["bias"] is None for p in parts):
        return None
    return torch.cat([p["bias"] if p["bias"] is not None else torch.zeros(n) for p, n in zip(parts, sizes)])


class Q8Plan:
    """One int8-activation kernel call prepared for the rows of several INT/PoT linears that
    read the same input (Q/K/V, gate/up): their layouts concatenated along N so that a
    decoding step makes one call (and one thread team) instead of three, with every
    constant argument converted once. The weights are frozen at construction: a plan does
    not see later changes of the modules' packed tensors (build a new one)."""

    def __init__(self, modules: list):
        spec = modules[0].spec
        k = modules[0].in_features
        parts = [_prep_int_q8(m) for m in modules]
        self.sizes = [m.out_features for m in modules]
        n = sum(self.sizes)
        self.k, self.n = k, n
        w = torch.cat([p["w"] for p in parts], 0).contiguous()
        scales = torch.cat([p["scales"] for p in parts], 0).contiguous()
        szs = torch.cat([p["szs"] for p in parts], 0).contiguous()
        bias = _fused_bias(parts, self.sizes)
        self._keep = (w, scales, szs, bias, parts[0]["table"])
        _drop_unkept_pages(modules, self._keep)
        self.args = _q8_args(spec, k, n, {"w": w, "rows": parts[0]["rows"], "scales": scales, "szs": szs, "bias": bias})
        self.table = _ptr(parts[0]["table"])
        self.threads = self._pick_threads()

    def _pick_threads(self) -> int:
        x = torch.randn(1, self.k)

        def run(t: int) -> None:
            self.threads = t
            self(x)

        return pick_threads(run, ("q8", self.args[0], self.n, self.args[4], self.args[5], self.args[7], self.table is None))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` float32 ``[rows, K]`` contiguous -> ``[rows, N]`` (into ``out`` if given)."""
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32) if out is None else out
        _lib.anybit_int_q8_gemm(x.data_ptr(), x.shape[0], *self.args, y.data_ptr(), self.threads, self.table)
        return y


_THREADS: dict[tuple, int] = {}


def pick_threads(run, key: tuple) -> int:
    """One thread or torch's, whichever runs ``run(threads)`` (one batch-1 product) faster
    here: a thread team's fork and join costs more than a small GEMV, and where the line
    lies depends on the machine (a fixed work threshold kept every SmolLM2 bit-plane and BCQ
    layer on one thread in decoding, 20-40 % slower on a 2-core Zen 1). Timed once per
    ``key`` (the product's kind and shape) and thread count: a model's layers of one shape
    share the answer, so building a decoder times a handful of products, not every layer."""
    import time

    full = torch.get_num_threads()
    if full == 1:
        return 1
    key = (*key, full, _lib.anybit_get_isa())
    if key in _THREADS:
        return _THREADS[key]
    best = None
    for t in (1, full, 1, full):  # twice each, alternating: the first calls warm the caches
        for _ in range(3):
            run(t)
        t0 = time.perf_counter()
        for _ in range(20):
            run(t)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, t)
    _THREADS[key] = best[1]
    return best[1]


def _struct_threads(st: "LinStruct") -> int:
    """:func:`pick_threads` for one prepared linear of the decoding step."""
    x = torch.randn(1, st.K)
    y = torch.empty(1, st.N)

    def run(t: int) -> None:
        st.threads = t
        _lib.anybit_lin_call(ctypes.byref(st), x.data_ptr(), y.data_ptr())

    return pick_threads(run, (st.kind, st.K, st.N, st.bits, st.gsize, st.abits))


class LinStruct(ctypes.Structure):
    """``AnybitLin`` of anybit_native.cpp: one prepared linear of the native decoding step."""
    _fields_ = [("kind", c_int64), ("K", c_int64), ("N", c_int64), ("threads", c_int64), ("bias", c_void_p),
                ("w", c_void_p), ("row_bytes", c_int64), ("bits", c_int64), ("gsize", c_int64), ("G", c_int64),
                ("B", c_int64), ("scales", c_void_p), ("szs", c_void_p), ("table", c_void_p), ("Npad", c_int64),
                ("alpha", c_void_p), ("offset", c_void_p), ("W", c_int64), ("wsigned", c_int64), ("abits", c_int64),
                ("asym", c_int64), ("agroup", c_int64), ("wsum", c_void_p)]


class LayerStruct(ctypes.Structure):
    """``AnybitLayer`` of anybit_native.cpp: one decoder layer of the native decoding step."""
    _fields_ = [("ln1", c_void_p), ("eps1", c_float), ("qkv", LinStruct * 3), ("n_qkv", c_int64), ("o", LinStruct),
                ("ln2", c_void_p), ("eps2", c_float), ("gu", LinStruct * 2), ("n_gu", c_int64), ("down", LinStruct),
                ("qn", c_void_p), ("kn", c_void_p), ("neps", c_float), ("kc", c_void_p), ("vc", c_void_p)]


def _q8_struct(args: tuple, table: int | None, threads: int) -> LinStruct:
    """The :class:`LinStruct` (kind 0) of the int8 kernel's arguments (:func:`_q8_args`)."""
    (k, w, row_bytes, n, bits, g, ng, block, scales, szs, bias) = args
    return LinStruct(kind=0, K=k, N=n, threads=threads, bias=bias, w=w, row_bytes=row_bytes, bits=bits, gsize=g,
                     G=ng, B=block, scales=scales, szs=szs, table=table)


def lin_struct(item) -> LinStruct | None:
    """The native decoding step's view of a :class:`Q8Plan`, :class:`BCQPlan` or :class:`BitplanePlan`,
    or of one BCQ / bit-plane QuantLinear whose batch-1 kernel applies (None: it needs the PyTorch
    path). The module's kernel layout is cached on it; the struct only points into it."""
    from ..nn.qlinear import QuantLinear

    if isinstance(item, (BCQPlan, BitplanePlan)):
        return item.struct
    if isinstance(item, Q8Plan):
        return _q8_struct(item.args, item.table, item.threads)
    if _load() is None:
        return None
    if isinstance(item, torch.nn.Linear):
        return _f32_struct(item) if F32_STEP else None
    if not isinstance(item, QuantLinear):
        return None
    st = _module_struct(item)
    if st is not None:
        st.threads = _struct_threads(st)
    return st


# False: a float model's decoding step stays in PyTorch (ANYBIT_F32_STEP=0; for comparisons)
F32_STEP = os.environ.get("ANYBIT_F32_STEP", "1") != "0"


def _f32_weight_struct(weight: torch.Tensor, bias: torch.Tensor | None) -> LinStruct | None:
    """Kind 4 on a float32 weight ``[N, K]`` and bias read in place (pointed to, not copied), or
    None where they are not float32, contiguous and on the CPU."""
    if any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu")
           for t in (weight, bias)):
        return None
    n, k = weight.shape
    return LinStruct(kind=4, K=k, N=n, threads=_threads(weight.numel()), bias=_ptr(bias), w=weight.data_ptr())


def _f32_struct(lin: torch.nn.Linear) -> LinStruct | None:
    """Kind 4 of a float32 nn.Linear for the decoding step (batch 1 on its measured thread count)."""
    st = _f32_weight_struct(lin.weight, lin.bias)
    if st is not None:
        st.threads = _struct_threads(st)
    return st


# A float32 linear on a prompt's rows through the native float GEMM (f32_gemm_tiles of
# kernels_decode.inc: register tiles of inner products, no packing) rather than PyTorch's BLAS, up
# to a number of rows that grows with K, since each tile ends in lane sums that weigh more the
# shorter K is (benchmarks/f32_gemm.py, 2-core Zen 4, native / MKL time): K >= 1024: 0.56-0.95 at
# 4-128 rows (LLaMA-7B's shapes, SmolLM2's 576x1536); K = 576: 0.31-0.96 at 2-64 rows, 1.01-1.06
# at 96-128; K = 288: 0.42-0.79 at 2-16 rows, 1.03-1.16 at 32-64; K = 64-191 (stories260K-sized):
# 0.52-1.08 at 2-8 rows, 1.01-1.72 at 16, up to 2.2 at 32-64. ANYBIT_F32_GEMM_ROWS=0: always BLAS.
F32_GEMM_ROWS = int(os.environ.get("ANYBIT_F32_GEMM_ROWS", "128"))
F32_GEMM_ROWS_BY_K = ((1024, 128), (512, 64), (192, 16), (0, 8))  # (least K, most rows)


def f32_gemm_rows(k: int) -> int:
    """The most rows of a float32 linear with ``k`` inputs that :func:`f32_linear` runs natively."""
    return min(F32_GEMM_ROWS, next(rows for least, rows in F32_GEMM_ROWS_BY_K if k >= least))


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors, on the native float GEMM where it
    is the faster (up to :func:`f32_gemm_rows` rows, no autograd), else ``F.linear``."""
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    st = None
    if (0 < rows <= f32_gemm_rows(k) and _load() is not None and x.dtype is torch.float32 and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        st = _f32_weight_struct(weight, bias)
    if st is None:
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(rows, k).contiguous()
    y = x2.new_empty(rows, st.N)
    _lib.anybit_lin_rows(ctypes.byref(st), x2.data_ptr(), rows, y.data_ptr(), _threads(rows * st.N * k))
    return y.view(*x.shape[:-1], st.N)


def _bitplane_struct(spec, act, k: int, n: int, d: dict, threads: int) -> LinStruct:
    """Kind 3: the bit-plane integer-dot kernel on the layout ``d`` (_prep_bitplane_dots's keys)
    of ``n`` rows (one module's, or a :class:`BitplanePlan`'s parts concatenated)."""
    g, ng = _group(spec, k)
    return LinStruct(kind=3, K=k, N=n, threads=threads, bias=_ptr(d["bias"]), w=_ptr(d["w"]),
                     row_bytes=d["w"].shape[1] // d["rows"], B=d["rows"], bits=spec.bits, gsize=g, G=ng,
                     scales=_ptr(d["sw"]), szs=_ptr(d["aw"]), alpha=_ptr(d["U"]), abits=act.bits,
                     asym=int(not act.sym), agroup=-1 if act.group_size == -1 else g)


def _module_struct(item) -> LinStruct | None:
    spec, act = item.spec, item.act
    n, k = item.shape
    g, ng = _group(spec, k)
    threads = _threads(n * k)
    if spec.format in ("bcq", "bcq16") and bcq_supported(item):
        d = _cached(item, _prep_bcq)
        return LinStruct(kind=1, K=k, N=n, threads=threads, bias=_ptr(d["bias"]), w=_ptr(d["planes"]), bits=spec.bits,
                         gsize=g, G=ng, Npad=d["npad"], alpha=_ptr(d["alpha"]), offset=_ptr(d["offset"]))
    if spec.format == "bitplane" and bitplane_supported(item) and bitplane_dots(item):
        return _bitplane_struct(spec, act, k, n, _cached(item, _prep_bitplane_dots), threads)
    if spec.format == "bitplane" and bitplane_supported(item):
        d = _cached(item, _prep_bitplane)
        return LinStruct(kind=2, K=k, N=n, threads=threads, bias=_ptr(d["bias"]), w=_ptr(d["wplanes"]), bits=spec.bits,
                         gsize=g, G=ng, Npad=d["npad"], W=d["W"], wsigned=int(spec.sym), scales=_ptr(d["sw"]),
                         szs=_ptr(d["zw"]), wsum=_ptr(d["wsum"]), abits=act.bits, asym=int(not act.sym),
                         agroup=-1 if act.group_size == -1 else g)
    return None


# False: BCQ linears of one input stay separate calls (for comparisons)
BCQ_FUSE = True


class BCQPlan:
    """One BCQ LUT-GEMM call for several BCQ linears that read the same input (Q/K/V,
    gate/up): their row blocks, scales and offsets concatenated along N, so that a token
    builds the activation tables once per input instead of once per linear, and the thread
    team passes one barrier instead of three. Built from the packed tensors (not cached on
    the modules: one copy of the layout); frozen at construction, as :class:`Q8Plan`."""

    def __init__(self, modules: list):
        spec, k = modules[0].spec, modules[0].in_features
        parts = [_prep_bcq(m) for m in modules]
        self.sizes = [m.out_features for m in modules]
        self.k, self.n = k, sum(self.sizes)
        planes = torch.cat([p["planes"] for p in parts], 0).contiguous()  # [Npad/16, chunks/2, q, 2, 16]
        alpha = torch.cat([p["alpha"] for p in parts], 0).contiguous()  # [Npad/16, G, q, 16]
        offset = torch.cat([p["offset"] for p in parts], 0).contiguous()  # [Npad/16, G, 16]
        bias = _fused_bias(parts, self.sizes)
        self._keep = (planes, alpha, offset, bias)
        drop_file_pages(t for m in modules for t in m.packed().values())
        g, ng = _group(spec, k)
        self.struct = LinStruct(kind=1, K=k, N=self.n, threads=_threads(self.n * k), bias=_ptr(bias), w=_ptr(planes),
                                bits=spec.bits, gsize=g, G=ng, Npad=self.n, alpha=_ptr(alpha), offset=_ptr(offset))
        self.struct.threads = _struct_threads(self.struct)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` float32 ``[rows, K]`` contiguous (rows <= BCQ_MAX_ROWS) -> ``[rows, N]``."""
        st, m = self.struct, x.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32) if out is None else out
        threads = st.threads if m == 1 else _threads(m * self.n * self.k)
        _lib.anybit_bcq_gemm(x.data_ptr(), m, st.K, st.w, st.Npad, st.N, st.bits, st.gsize, st.G, st.alpha, st.offset,
                             st.bias, y.data_ptr(), threads)
        return y


def bcq_plan(modules: list) -> BCQPlan | None:
    """A :class:`BCQPlan` for two or more BCQ linears with the same spec and input whose
    row counts are multiples of 16 (no padding rows between them), else None."""
    from ..nn.qlinear import QuantLinear

    if not BCQ_FUSE or _load() is None or len(modules) < 2 or not all(isinstance(m, QuantLinear) for m in modules):
        return None
    first = modules[0]
    if not all(m.spec == first.spec and m.spec.format in ("bcq", "bcq16") and bcq_supported(m)
               and m.in_features == first.in_features and m.out_features % 16 == 0 for m in modules):
        return None
    return BCQPlan(modules)


class BitplanePlan:
    """One bit-plane integer-dot call for several bit-plane linears that read the same input
    (Q/K/V, gate/up of ABQ-LLM's and FlexQ's WxAy models): their layouts concatenated along N,
    so that a token quantizes its activations once per input instead of once per linear and the
    thread team passes one barrier instead of three. Frozen at construction, as :class:`Q8Plan`."""

    def __init__(self, modules: list):
        spec, act, k = modules[0].spec, modules[0].act, modules[0].in_features
        parts = [_prep_bitplane_dots(m) for m in modules]
        self.sizes = [m.out_features for m in modules]
        self.k, self.n = k, sum(self.sizes)
        d = {key: torch.cat([p[key] for p in parts], 0).contiguous() for key in ("w", "sw", "aw", "U")}
        d["rows"], d["bias"] = parts[0]["rows"], _fused_bias(parts, self.sizes)
        self._keep = d
        _drop_unkept_pages(modules, d.values())
        self.struct = _bitplane_struct(spec, act, k, self.n, d, _threads(self.n * k))
        self.struct.threads = _struct_threads(self.struct)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` float32 ``[rows, K]`` contiguous (rows <= q8_rows()) -> ``[rows, N]``."""
        st, m = self.struct, x.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32) if out is None else out
        threads = st.threads if m == 1 else _threads(m * self.n * self.k)
        _lib.anybit_lin_rows(ctypes.byref(st), x.data_ptr(), m, y.data_ptr(), threads)
        return y


# False: bit-plane linears of one input stay separate calls (for comparisons)
BITPLANE_FUSE = True


def bitplane_plan(modules: list) -> BitplanePlan | None:
    """A :class:`BitplanePlan` for two or more bit-plane linears on the integer-dot kernel with the
    same weight and activation specs and input, whose row counts fill whole blocks of the
    kernel's layout (16 or 4 rows: no padding rows between them), else None."""
    from ..nn.qlinear import QuantLinear

    if (not BITPLANE_FUSE or _load() is None or len(modules) < 2
            or not all(isinstance(m, QuantLinear) for m in modules)):
        return None
    first = modules[0]
    if not all(m.spec == first.spec and m.act == first.act and m.spec.format == "bitplane"
               and m.in_features == first.in_features and bitplane_supported(m) and bitplane_dots(m)
               for m in modules):
        return None
    rows = bitplane_block_rows()
    if any(m.out_features % rows for m in modules):
        return None
    return BitplanePlan(modules)


def q8_plan(modules: list) -> Q8Plan | None:
    """A :class:`Q8Plan` for ``modules`` (same input), or None where the int8 kernel does not
    serve all of them alike (another format, quantized activations, different specs)."""
    from ..nn.qlinear import QuantLinear

    if _load() is None or not all(isinstance(m, QuantLinear) for m in modules):
        return None
    first = modules[0]
    if not all(m.spec == first.spec and m.in_features == first.in_features and _q8_usable(m) for m in modules):
        return None
    if len(modules) > 1 and any(m.out_features % q8_block_rows(m.spec, m.in_features) for m in modules):
        return None
    return Q8Plan(modules)


# ------------------------------------------------------------------ eager calls, prepared once

def _routing() -> tuple:
    """What decides which native kernel and layout serve a module: the library loaded (the A/B
    scripts swap it), the ISA in use and the switches between kernels."""
    return (_lib, _isa_gen, INT_ACT8, BITPLANE_DOTS, FAST_LINEAR)


def _fast_limit(kind: int) -> int:
    """The most activation rows the kernel of ``kind`` takes (the full dispatch's limits, read
    per call: benchmarks and tests change them)."""
    return BCQ_MAX_ROWS if kind == 1 else MAX_ROWS_BITPLANE if kind == 2 else q8_rows()


class FastLinear:
    """One QuantLinear's native kernel prepared for eager calls: ``kernels.linear`` asks it
    before the full dispatch. The full path (backend choice, predicates, the layout cache's
    lookup, reshapes and dtype casts, ~16 converted ctypes arguments) doubled the time of a
    SmolLM2-sized GEMV call on the 2-core AVX2 machine (benchmarks/eager_call_ab.py); this one checks the input and
    that nothing it was built from changed, and makes one call with the layout's
    :class:`LinStruct`. Batch 1 runs on the thread count :func:`pick_threads` measured for the
    shape (as the decoding step does). It answers None to a call it does not serve (not
    float32/CPU/contiguous, more rows than its kernel takes, a changed module or setting),
    which then takes the full dispatch, where the kernels are the same."""

    __slots__ = ("key", "spec", "act", "routing", "nthreads", "st", "addr", "n", "k", "kind", "_keep")

    def __init__(self, module, st: LinStruct, keep):
        self.key, self.spec, self.act = module.packed_key(), module.spec, module.act
        self.routing, self.nthreads = _routing(), torch.get_num_threads()
        self.st, self.addr, self.n, self.k, self.kind = st, ctypes.addressof(st), st.N, st.K, st.kind
        self._keep = keep  # the layout the struct points into stays alive with it

    def valid(self, module) -> bool:
        return (module.packed_key() == self.key and module.spec is self.spec and module.act is self.act
                and _routing() == self.routing and torch.get_num_threads() == self.nthreads)

    def __call__(self, x: torch.Tensor, module) -> torch.Tensor | None:
        # Every line here is paid per eager call (~4 us of Python per call hot, 12-15 cold, when
        # a SmolLM2-sized kernel takes 15-30 us): hence x.new_empty with int sizes (float32 as x,
        # 0.9 us; torch.empty with a shape tuple and dtype: 1.5) and the 2-D case spelled out.
        if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous():
            return None
        shape = x.shape
        if shape[-1] != self.k:
            return None
        rows = shape[0] if len(shape) == 2 else x.numel() // self.k
        if not 0 < rows <= _fast_limit(self.kind) or not self.valid(module):
            return None
        y = x.new_empty(rows, self.n) if len(shape) == 2 else x.new_empty(*shape[:-1], self.n)
        _lib.anybit_lin_rows(self.addr, x.data_ptr(), rows, y.data_ptr(),
                             self.st.threads if rows == 1 else _threads(rows * self.n * self.k))
        return y


# False: no prepared calls, every eager call takes the full dispatch (ANYBIT_FAST_LINEAR=0; for comparisons)
FAST_LINEAR = os.environ.get("ANYBIT_FAST_LINEAR", "1") != "0"


def fast_linear(x: torch.Tensor, module) -> FastLinear | None:
    """A :class:`FastLinear` for ``module``, made after a call on ``x`` that it would have
    served (float32, few enough rows: a layout is not built for calls that never use it), where
    its native kernel is one of the prepared kinds (the int8 INT/PoT kernel, the BCQ LUT-GEMM,
    bit-plane), else None (e.g. the float INT/PoT kernels: groups that are not a multiple of
    32, ``ANYBIT_INT_ACT8=0``)."""
    if not FAST_LINEAR or _load() is None or not hasattr(_lib, "anybit_lin_rows") or x.dtype is not torch.float32:
        return None
    fmt = module.spec.format
    kind = 0 if fmt in ("int", "pot", "potz") else 1 if fmt in ("bcq", "bcq16") else 3 if bitplane_dots(module) else 2
    if x.numel() // max(x.shape[-1], 1) > _fast_limit(kind):
        return None
    if kind == 0:
        if not _q8_usable(module):
            return None
        d = _cached(module, _prep_int_q8)
        (n, k) = module.shape
        args = _q8_args(module.spec, k, n, d)
        st = _q8_struct(args, _ptr(d["table"]), 1)
    else:
        st = _module_struct(module)
        if st is None:
            return None
        d = module._native_cache[1]  # the layouts _module_struct pointed st into
    st.threads = _struct_threads(st)
    return FastLinear(module, st, d)
