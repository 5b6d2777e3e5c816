"""Power-of-two weights (PoT; PoTPTQ, SPEC §2).

``w ≈ s · sign · 2^e`` with one scale ``s`` per (row, group) and a b-bit code per weight:
1 sign bit + (b−1) exponent bits, ``e = clamp(round(log2(|w|/s)), 0, 2^(b−1)−1)``.

Two formats share this module:
  ``pot``  no zero level (SPEC §2 as written): 2-bit gives ±s, ±2s; 3-bit ±s … ±8s;
           4-bit ±s … ±128s.
  ``potz`` a zero level: exponent code 0 means 0 and code m ≥ 1 means ±s·2^(m−1), so one
           magnitude fewer (2-bit: 0, ±s; 3-bit: 0, ±s … ±4s); |w| < s/2 rounds to 0.
           Without it every small weight is pushed up to ±s; on SmolLM2-135M that bias
           compounds over 30 blocks into ppl 10^5 (docs/potptq.md), on stories260K the
           lost magnitude costs more than the zero level gains.

Code layout: ``code = sign << (b−1) | e`` (sign 1 = negative), packed with
:mod:`bitpack`. Stored tensors:
  ``qweight`` uint8 ``[N, ceil(K·b/8)]``
  ``scales``  float16 ``[N, G]`` (positive, kept in float16's normal range so that the
             exponent-add dequantization below is exact)

Dequantization by exponent add (the paper's speed idea): with the float bit pattern of
the scale, ``|s|·2^e`` is one integer add of ``e << mantissa_bits`` into the exponent
field, and the sign is OR-ed in separately (:func:`dequantize_exponent_add`); it is
bit-identical to ``s·sign·2^e`` for normal results.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import bitpack
from .base import FormatSpec, WeightFormat, expand_groups, grouped, num_groups

SCALE_DTYPE = torch.float16
DEFAULT_GRID = tuple(0.01 * i for i in range(1, 201))

# (integer view dtype, mantissa bits, sign mask) per float dtype
_FLOAT_BITS = {
    torch.float32: (torch.int32, 23, -(1 << 31)),
    torch.float16: (torch.int16, 10, -(1 << 15)),
    torch.bfloat16: (torch.int16, 7, -(1 << 15)),
}


def max_exponent(bits: int) -> int:
    """The largest exponent *code* (b−1 bits)."""
    return (1 << (bits - 1)) - 1


def has_zero(spec: FormatSpec) -> bool:
    return spec.format == "potz"


def top_exponent(spec: FormatSpec) -> int:
    """The exponent of the largest level, ``s·2^top``: the code range less the zero code."""
    return max_exponent(spec.bits) - int(has_zero(spec))


def base_scale(w: torch.Tensor, spec: FormatSpec, rule: str = "pow") -> torch.Tensor:
    """Per-group base scale ``s0 [N, G]`` from the group's max|w| (SPEC §3, two readings):
    ``pow``: ``max|w| / 2^(E−1)``; ``range``: ``max|w| / (2^E − 1)``, with E the top exponent
    (for ``potz`` at 2 bits, E = 0: the only magnitude is s, and s0 = max|w|)."""
    wg, mask = grouped(w.float().abs(), spec.group_size)
    amax = torch.where(mask, wg, 0).amax(-1)
    e_max = top_exponent(spec)
    if e_max == 0:
        return amax
    den = 2.0 ** (e_max - 1) if rule == "pow" else float((1 << e_max) - 1)
    return amax / den


def _clamp_scale(s: torch.Tensor) -> torch.Tensor:
    """Positive, within float16's normal range even after ×2^7 (the largest 4-bit exponent),
    so that the exponent add stays exact."""
    tiny = torch.finfo(SCALE_DTYPE).tiny
    return s.clamp(min=tiny, max=float(torch.finfo(SCALE_DTYPE).max) / 2**7)


def encode(w: torch.Tensor, scales: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` (sign << (b−1) | e) of ``w`` for per-group ``scales [N, G]``."""
    k = w.shape[-1]
    s = expand_groups(scales.float(), spec.group_size, k)
    mag = w.float().abs() / s
    e = torch.round(torch.log2(mag.clamp_min(1e-30))).clamp(0, top_exponent(spec))
    sign = w < 0
    if has_zero(spec):  # code e+1 for s·2^e; code 0, sign cleared, for |w| < s/2
        e = torch.where(mag < 0.5, 0, e + 1)
        sign = sign & (e > 0)
    sign = sign.to(torch.uint8)
    return (sign << (spec.bits - 1)) | e.to(torch.uint8)


def decode(codes: torch.Tensor, scales: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Plain dequantization ``s · sign · 2^e`` in float32 (``potz``: code 0 is 0, code m is 2^(m−1))."""
    k = codes.shape[-1]
    s = expand_groups(scales.float(), spec.group_size, k)
    e = (codes & max_exponent(spec.bits)).float()
    sign = 1.0 - 2.0 * (codes >> (spec.bits - 1)).float()
    if has_zero(spec):
        return torch.where(e == 0, 0.0, s * sign * torch.exp2(e - 1))
    return s * sign * torch.exp2(e)


def dequantize_exponent_add(codes: torch.Tensor, scales: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Dequantize with integer ops only, in the dtype of ``scales`` (float32, float16, bfloat16).

    magnitude = bits(|s|) + (e << mantissa_bits)   (one integer add into the exponent field)
    sign      = sign(s) XOR code sign, OR-ed into the sign bit
    ``potz``: the add is of (e − 1) (the −1 folds into the scale once per group: s/2) and
    code 0 is masked to +0.
    """
    int_dtype, mant, sign_mask = _FLOAT_BITS[scales.dtype]
    k = codes.shape[-1]
    s_bits = expand_groups(scales, spec.group_size, k).contiguous().view(int_dtype)
    e = (codes & max_exponent(spec.bits)).to(int_dtype)
    code_sign = (codes >> (spec.bits - 1)).to(torch.bool)
    mag = (s_bits & ~sign_mask) + ((e - int(has_zero(spec))) << mant)
    neg = (s_bits < 0) ^ code_sign
    out = torch.where(neg, mag | sign_mask, mag)
    if has_zero(spec):
        out = torch.where(e == 0, 0, out)
    return out.view(scales.dtype)


def group_error(w: torch.Tensor, scales: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Squared error per group ``[N, G]`` of PoT-quantizing ``w`` with ``scales``."""
    wq = decode(encode(w, scales, spec), scales, spec)
    eg, mask = grouped(wq - w.float(), spec.group_size)
    return torch.where(mask, eg * eg, 0).sum(-1)


# elements of a weight searched at once by init_scales (a block of rows: 1 MiB of float32)
_SEARCH_ELEMENTS = 1 << 18


def init_scales(w: torch.Tensor, spec: FormatSpec, rule: str = "pow", grid=DEFAULT_GRID) -> torch.Tensor:
    """Step 1 of PoTPTQ (data-free): per group, ``s = s0·β`` for the β in ``grid`` that
    minimises ‖W_g − Q(W_g; s)‖² (SPEC §3); float16-representable scales.

    Vectorised over blocks of rows that stay in the caches across the candidates (the whole
    weight at once streamed it from memory 200 times: 4.4x the time at 2048x4096; same result,
    every row's search is its own); ``log2|w|`` is computed once per block, so each candidate costs
    a handful of elementwise ops (the sign never changes the error of a PoT level).
    """
    rows = max(1, _SEARCH_ELEMENTS // max(1, w.shape[-1]))
    if w.shape[0] > rows:
        return torch.cat([init_scales(w[i:i + rows], spec, rule, grid) for i in range(0, w.shape[0], rows)])
    s0 = base_scale(w, spec, rule)
    wg, mask = grouped(w.float().abs(), spec.group_size)
    a = torch.where(mask, wg, 0)
    log_a = torch.log2(a.clamp_min(1e-30))
    zero = has_zero(spec)
    # without a zero level a ragged group's padding (a = 0) lands on the level s, adding s²
    # each: subtracted below (with one, it lands on 0 and adds nothing)
    npad = torch.zeros(()) if zero else (~mask).sum(-1).float()
    e_max = top_exponent(spec)
    best_err = best = None
    for beta in grid:
        s = _clamp_scale(s0 * beta).to(SCALE_DTYPE).float()  # [N, G]
        su = s.unsqueeze(-1)
        e = torch.round(log_a - torch.log2(su)).clamp_(0, e_max)
        level = su * torch.exp2(e)
        if zero:
            level.mul_(a >= 0.5 * su)  # 0 below half the scale (level > 0: exactly 0.0)
        d = a - level
        err = (d * d).sum(-1) - npad * s * s
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


class PoTParts(NamedTuple):
    codes: torch.Tensor  # [N, K] sign + exponent codes
    scales: torch.Tensor  # [N, G] float16, as stored (the exponent add works in its bits)


class PoTFormat(WeightFormat):
    name = "pot"
    min_bits = 2
    max_bits = 4
    Parts = PoTParts

    def packed_layout(self, spec: FormatSpec, shape: tuple[int, int]):
        n, k = shape
        return {
            "qweight": ((n, bitpack.packed_bytes(k, spec.bits)), torch.uint8),
            "scales": ((n, num_groups(spec.group_size, k)), SCALE_DTYPE),
        }

    def pack(self, parts: PoTParts, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        codes, scales = parts
        return {"qweight": bitpack.pack(codes, spec.bits), "scales": _clamp_scale(scales.float()).to(SCALE_DTYPE)}

    def unpack(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]):
        return PoTParts(bitpack.unpack(packed["qweight"], spec.bits, shape[1]), packed["scales"])

    def quantize(self, w, spec, scales=None, rule: str = "pow", grid=DEFAULT_GRID):
        """PoT codes for given ``scales``, or for the step-1 grid-searched ones."""
        if scales is None:
            scales = init_scales(w, spec, rule, grid)
        scales = _clamp_scale(scales.float()).to(SCALE_DTYPE).float()
        return self.pack(PoTParts(encode(w, scales, spec), scales), spec, tuple(w.shape))

    def dequantize(self, packed, spec, shape):
        codes, scales = self.unpack(packed, spec, shape)
        return dequantize_exponent_add(codes, scales, spec).float()


class PoTZeroFormat(PoTFormat):
    """PoT with a zero level (``potz``): same layout, exponent code 0 means 0."""

    name = "potz"
