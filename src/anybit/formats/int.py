"""Uniform integer weights (the INT format of SPEC §2).

Asymmetric: ``q = clamp(round(w/s) + z, 0, 2^b-1)``, ``w ≈ s·(q - z)``, with
``s = (max - min) / (2^b - 1)`` and ``z = round(-min / s)`` per group.
Symmetric: ``q ∈ [-2^(b-1), 2^(b-1)-1]``, ``s = absmax / (2^(b-1)-1)``; stored as the
unsigned code ``q + 2^(b-1)`` so that both variants share one decode ``s·(code - z)``
(symmetric has the constant ``z = 2^(b-1)``).

Stored tensors (the packed layout):
  ``qweight`` uint8 ``[N, ceil(K·b/8)]``  codes, :mod:`anybit.formats.bitpack` layout
  ``scales``  float16 ``[N, G]``           one scale per (row, group)
  ``qzeros``  uint8 ``[N, ceil(G·b/8)]``  zero points as b-bit codes (asymmetric only)
Scales are rounded to float16 *before* the codes are computed, so the packed model is
exactly the model that was evaluated. An asymmetric grid may use fewer than ``2^b`` levels
(``spec.levels``, ABQ-LLM's bit balance: codes ``0..levels−1``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import bitpack
from .base import FormatSpec, WeightFormat, expand_groups, grouped, num_groups, rows_per_chunk

SCALE_DTYPE = torch.float16
# smallest scale kept: float16 subnormals below this lose precision
_MIN_SCALE = 1e-5


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Signed integer range of the grid: asym ``[0, 2^b-1]``, sym ``[-2^(b-1), 2^(b-1)-1]``."""
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


SYM_RULES = ("absmax", "range", "signed")


def group_params(
    w: torch.Tensor, spec: FormatSpec, shrink: torch.Tensor | float = 1.0, sym_rule: str = "absmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scales [N, G] float32 on the float16 grid, zeros [N, G] float32 integers)``.

    ``shrink`` (scalar or ``[N, G]``) scales the min/max range, for clipping search.
    ``sym_rule`` (symmetric grids): ``absmax``, ``s = absmax / (2^(b−1) − 1)`` (codes
    ``−2^(b−1)+1 … 2^(b−1)−1`` used, the lowest unused); ``range``, the GPTQ / GPTQModel
    rule ``s = 2·absmax / (2^b − 1)`` around the zero point ``2^(b−1)`` (every code used,
    the top weight clipped to ``(2^(b−1)−1)·s``); ``signed``, ggml's Q4_0/Q5_0/Q8_0 rule
    ``s = w_ext / −2^(b−1)`` with ``w_ext`` the group's weight of largest magnitude, sign
    kept (so ``s`` may be negative): that weight lands exactly on the extra code, and every
    code is used at the finer step absmax / 2^(b−1). All store the same layout.
    """
    wg, mask = grouped(w.float(), spec.group_size)
    big = torch.finfo(torch.float32).max
    wmax = torch.where(mask, wg, -big).amax(-1)
    wmin = torch.where(mask, wg, big).amin(-1)
    if spec.sym:
        amax = torch.maximum(wmax.abs(), wmin.abs()) * shrink
        z = torch.full_like(amax, float(1 << (spec.bits - 1)))
        if sym_rule == "signed":
            ext = torch.where(wmax.abs() >= wmin.abs(), wmax, wmin) * shrink
            s = ext / -(1 << (spec.bits - 1))
            s = torch.where(s.abs() < _MIN_SCALE, torch.full_like(s, -_MIN_SCALE), s).to(SCALE_DTYPE).float()
            return s, z
        s = amax / ((1 << (spec.bits - 1)) - 1) if sym_rule == "absmax" else 2 * amax / ((1 << spec.bits) - 1)
        s = s.clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
        return s, z
    # asymmetric: the range always contains 0 so that zero weights stay exact
    wmax = (wmax.clamp_min(0) * shrink)
    wmin = (wmin.clamp_max(0) * shrink)
    s = ((wmax - wmin) / spec.qmax).clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
    z = torch.round(-wmin / s).clamp(0, spec.qmax)
    return s, z


def encode(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Codes ``uint8 [N, K]`` of ``w`` on the grid given by per-group scales and zeros."""
    k = w.shape[-1]
    s = expand_groups(scales, spec.group_size, k)
    z = expand_groups(zeros, spec.group_size, k)
    q = torch.round(w.float() / s) + z
    return q.clamp(0, spec.qmax).to(torch.uint8)


def decode(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Float32 weights ``s·(code - z)`` from unpacked codes, scales and zeros."""
    k = codes.shape[-1]
    s = expand_groups(scales.float(), spec.group_size, k)
    z = expand_groups(zeros.float(), spec.group_size, k)
    return s * (codes.float() - z)


def fake_quantize(w: torch.Tensor, spec: FormatSpec, shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``w`` (float32), the weight RTN would produce."""
    s, z = group_params(w, spec, shrink)
    return decode(encode(w, s, z, spec), s, z, spec)


class IntParts(NamedTuple):
    codes: torch.Tensor  # [N, K] unsigned b-bit codes (offset binary when symmetric)
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor  # [N, G] (2^(b-1) when symmetric)


class IntFormat(WeightFormat):
    name = "int"
    min_bits = 2
    max_bits = 8
    Parts = IntParts

    def packed_layout(self, spec: FormatSpec, shape: tuple[int, int]):
        n, k = shape
        g = num_groups(spec.group_size, k)
        layout = {
            "qweight": ((n, bitpack.packed_bytes(k, spec.bits)), torch.uint8),
            "scales": ((n, g), SCALE_DTYPE),
        }
        if not spec.sym:
            layout["qzeros"] = ((n, bitpack.packed_bytes(g, spec.bits)), torch.uint8)
        return layout

    def pack(self, parts: IntParts, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        codes, scales, zeros = parts
        out = {"qweight": bitpack.pack(codes, spec.bits), "scales": scales.to(SCALE_DTYPE)}
        if not spec.sym:
            out["qzeros"] = bitpack.pack(zeros.to(torch.uint8), spec.bits)
        return out

    def unpack(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]):
        n, k = shape
        codes = bitpack.unpack(packed["qweight"], spec.bits, k)
        scales = packed["scales"].float()
        if spec.sym:
            zeros = torch.full_like(scales, float(1 << (spec.bits - 1)))
        else:
            zeros = bitpack.unpack(packed["qzeros"], spec.bits, scales.shape[-1]).float()
        return IntParts(codes, scales, zeros)

    def quantize(self, w, spec, shrink=1.0, scales=None, zeros=None, sym_rule: str = "absmax"):
        """Round to nearest on the group grid (given ``scales``/``zeros``, or min/max ones).

        Rows are independent, so a large matrix (an output head of 32000 x 4096) is done in
        blocks of rows: the float temporaries stay ~16 MB instead of several copies of it."""
        n, k = w.shape
        codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
        all_s, all_z = [], []
        for r0 in range(0, n, rows_per_chunk(k)):
            rows = slice(r0, r0 + rows_per_chunk(k))
            if scales is None:
                sh = shrink[rows] if isinstance(shrink, torch.Tensor) and shrink.dim() == 2 else shrink
                s, z = group_params(w[rows], spec, sh, sym_rule)
            else:
                s, z = scales[rows], zeros[rows]
            codes[rows] = encode(w[rows], s, z, spec)
            all_s.append(s)
            all_z.append(z)
        return self.pack(IntParts(codes, torch.cat(all_s), torch.cat(all_z)), spec, (n, k))

    def dequantize(self, packed, spec, shape):
        codes, scales, zeros = self.unpack(packed, spec, shape)
        n, k = shape
        out = torch.empty(n, k, dtype=torch.float32, device=codes.device)
        for r0 in range(0, n, rows_per_chunk(k)):  # row blocks, as quantize
            rows = slice(r0, r0 + rows_per_chunk(k))
            out[rows] = decode(codes[rows], scales[rows], zeros[rows], spec)
        return out
