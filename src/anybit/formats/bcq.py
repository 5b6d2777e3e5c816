"""Binary-coding quantization (BCQ; LUT-GEMM, GPTQT; SPEC §2).

``w ≈ Σ_{i<q} α_i · b_i + offset`` with ``b_i ∈ {−1, +1}``, ``α`` per (row, group, bit)
and ``offset`` per (row, group).

Stored tensors:
  ``planes`` uint8 ``[q, N, ceil(K/8)]``  bit-plane i of every row, bit 1 ↔ b_i = +1,
                                         packed along K with :mod:`bitpack` (1 bit)
  ``alpha``  float16 ``[N, G, q]``
  ``offset`` float32 ``[N, G]``   (float32 so that the integer-grid conversion stays exact:
                                  ``Σα_i − s·z`` is rarely a float16 number)
Format ``bcq16``: the same with a float16 offset (16 bits per group fewer: 0.125 b/w at
g128), for fits that do not need the exact conversion (GPTQT's ``offset16``).

Fits:
  * :func:`fit_greedy` — LUT-GEMM's baseline: ``α_i = mean|r|``, ``b_i = sign(r)``,
    ``r −= α_i b_i`` (after removing the group mean as the offset);
  * :func:`fit_alternating` — greedy, then rounds of least-squares ``(α, offset)`` for fixed
    codes and the nearest of the ``2^q`` levels per weight for fixed ``α`` (optionally
    weighted per column, e.g. by the Hessian diagonal);
  * :func:`from_int` — the exact conversion of a uniform integer grid
    (``α_i = (s/2)·2^i``, ``offset = Σα_i − s·z``, ``b_i = 2·bit_i(q) − 1``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import bitpack
from .base import FormatSpec, WeightFormat, grouped, num_groups

COEF_DTYPE = torch.float16
OFFSET_DTYPE = torch.float32


def _levels(alpha: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``2^q`` values ``[..., 2^q]`` of a group and their sign patterns ``[2^q, q]`` (±1)."""
    q = alpha.shape[-1]
    idx = torch.arange(1 << q)
    signs = ((idx.unsqueeze(-1) >> torch.arange(q)) & 1).float() * 2 - 1  # [2^q, q]
    return alpha @ signs.t() + offset.unsqueeze(-1), signs


def _assign(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Best sign pattern per weight: ``wg [N, G, g]`` -> ``b [N, G, g, q]`` (±1)."""
    levels, signs = _levels(alpha, offset)  # [N, G, L]
    best = (wg.unsqueeze(-1) - levels.unsqueeze(-2)).abs().argmin(-1)  # [N, G, g]
    return signs[best]


def signs_of(b: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The fits' ``b [N, G, g, q]`` (±1, group-padded) as :class:`BCQParts` signs ``[q, N, K]``."""
    n, k = shape
    return b.reshape(n, -1, b.shape[-1])[:, :k].permute(2, 0, 1)


def _round_coefs(alpha: torch.Tensor, offset: torch.Tensor, offset_dtype: torch.dtype = OFFSET_DTYPE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return alpha.to(COEF_DTYPE).float(), offset.to(offset_dtype).float()


def fit_greedy(w: torch.Tensor, spec: FormatSpec):
    """Greedy BCQ: returns ``(b [N, G, g, q] ±1, alpha [N, G, q], offset [N, G])``; NaN-padded groups."""
    wg, mask = grouped(w.float(), spec.group_size)
    cnt = mask.sum(-1).clamp_min(1)
    offset = torch.where(mask, wg, 0).sum(-1) / cnt
    r = torch.where(mask, wg - offset.unsqueeze(-1), 0)
    alphas, bs = [], []
    for _ in range(spec.bits):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().sum(-1) / cnt
        r = torch.where(mask, r - a.unsqueeze(-1) * b, 0)
        alphas.append(a)
        bs.append(b)
    return torch.stack(bs, -1), torch.stack(alphas, -1), offset


def _refine(wg, mask, cw, b, rounds: int):
    """``rounds`` of weighted least squares for (α, offset), then best codes per weight."""
    q = b.shape[-1]
    target = torch.where(mask, wg, 0)
    eye = torch.eye(q + 1)
    alpha = offset = None
    for _ in range(rounds):
        A = torch.cat([b, torch.ones_like(b[..., :1])], -1) * mask.unsqueeze(-1)  # [N, G, g, q+1]
        Aw = A * cw.unsqueeze(-1)
        lhs = Aw.transpose(-1, -2) @ A
        # a small ridge keeps groups whose sign columns are collinear solvable
        lhs = lhs + eye * (1e-6 * lhs.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1) + 1e-12)
        rhs = (Aw * target.unsqueeze(-1)).sum(-2)
        sol = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
        alpha, offset = sol[..., :q], sol[..., q]
        b = _assign(target, alpha, offset)
    levels = (alpha.unsqueeze(-2) * b).sum(-1) + offset.unsqueeze(-1)
    err = (cw * (target - levels) ** 2).sum(-1)  # [N, G]
    return b, alpha, offset, err


def fit_alternating(w: torch.Tensor, spec: FormatSpec, rounds: int = 15, col_weight: torch.Tensor | None = None):
    """Alternating least squares for (α, offset) and best codes per weight, ``rounds`` times,
    started both from the greedy fit and from the uniform q-bit grid of the group's range;
    per group the start that ends with the smaller error is kept.

    ``col_weight [K]`` weights each column's squared error (e.g. ``diag(H)`` so that the fit
    follows the layer output error rather than the weight error).
    """
    wg, mask = grouped(w.float(), spec.group_size)
    if col_weight is not None:
        cw, _ = grouped(col_weight.float().clamp_min(0).expand_as(w), spec.group_size)
        cw = torch.where(mask, cw, 0)
    else:
        cw = mask.float()
    from . import int as intfmt  # the uniform start: the q-bit min/max grid, in BCQ form

    ispec = FormatSpec("int", spec.bits, spec.group_size, False)
    s, z = intfmt.group_params(w, ispec)
    b_uniform, _, _ = from_int(intfmt.encode(w, s, z, ispec), s, z, spec.bits, spec.group_size)
    b_greedy, _, _ = fit_greedy(w, spec)
    b1, a1, o1, e1 = _refine(wg, mask, cw, b_greedy, max(rounds, 1))
    b2, a2, o2, e2 = _refine(wg, mask, cw, b_uniform, max(rounds, 1))
    pick = (e2 < e1)
    return (torch.where(pick[..., None, None], b2, b1), torch.where(pick[..., None], a2, a1),
            torch.where(pick, o2, o1))


def from_int(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int):
    """Exact BCQ form of a uniform integer weight ``s·(code − z)``."""
    k = codes.shape[-1]
    i = torch.arange(bits, dtype=torch.float32)
    alpha = scales.float().unsqueeze(-1) / 2 * (2.0 ** i)  # [N, G, q]
    offset = alpha.sum(-1) - scales.float() * zeros.float()
    bits_ = ((codes.to(torch.int64).unsqueeze(-1) >> torch.arange(bits)) & 1).float() * 2 - 1  # [N, K, q]
    g = k if group_size == -1 else group_size
    ng = math.ceil(k / g)
    pad = ng * g - k
    b = torch.nn.functional.pad(bits_, (0, 0, 0, pad), value=1.0).reshape(codes.shape[0], ng, g, bits)
    return b, alpha, offset


class BCQParts(NamedTuple):
    signs: torch.Tensor  # [q, N, K] ±1
    alpha: torch.Tensor  # [N, G, q]
    offset: torch.Tensor  # [N, G]


class BCQFormat(WeightFormat):
    name = "bcq"
    min_bits = 1
    max_bits = 8
    offset_dtype = OFFSET_DTYPE

    def packed_layout(self, spec: FormatSpec, shape: tuple[int, int]):
        n, k = shape
        g = num_groups(spec.group_size, k)
        return {
            "planes": ((spec.bits, n, bitpack.packed_bytes(k, 1)), torch.uint8),
            "alpha": ((n, g, spec.bits), COEF_DTYPE),
            "offset": ((n, g), self.offset_dtype),
        }

    Parts = BCQParts

    def pack(self, parts: BCQParts, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        signs, alpha, offset = parts
        planes = torch.stack([bitpack.pack((signs[i] > 0).to(torch.uint8), 1) for i in range(spec.bits)])
        return {"planes": planes, "alpha": alpha.to(COEF_DTYPE), "offset": offset.to(self.offset_dtype)}

    def unpack(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]):
        """-> ``(signs [q, N, K] ±1 float, alpha [N, G, q], offset [N, G])`` in float32."""
        n, k = shape
        signs = bitpack.unpack(packed["planes"], 1, k).float() * 2 - 1
        return BCQParts(signs, packed["alpha"].float(), packed["offset"].float())

    def quantize(self, w, spec, fit: str = "alternating", rounds: int = 15, col_weight=None):
        if fit == "greedy":
            b, alpha, offset = fit_greedy(w, spec)
        else:
            b, alpha, offset = fit_alternating(w, spec, rounds, col_weight)
        alpha, offset = _round_coefs(alpha, offset, self.offset_dtype)
        # codes chosen for the float16 coefficients actually stored
        wg, mask = grouped(w.float(), spec.group_size)
        b = _assign(torch.where(mask, wg, 0), alpha, offset)
        return self.pack(BCQParts(signs_of(b, tuple(w.shape)), alpha, offset), spec, tuple(w.shape))

    def dequantize(self, packed, spec, shape):
        n, k = shape
        signs, alpha, offset = self.unpack(packed, spec, shape)
        g = k if spec.group_size == -1 else spec.group_size
        a = alpha.repeat_interleave(g, dim=1)[:, :k]  # [N, K, q]
        off = offset.repeat_interleave(g, dim=1)[:, :k]
        return (a * signs.permute(1, 2, 0)).sum(-1) + off


class BCQHalfOffsetFormat(BCQFormat):
    """BCQ with a float16 offset (``bcq16``): same layout, 16 bits per group fewer."""

    name = "bcq16"
    offset_dtype = torch.float16
