"""Integer weights stored as bit-planes (ABQ-LLM, FlexQ; SPEC §2), the layout of the
AND + popcount ``WxAy`` GEMM.

Same grid as :mod:`anybit.formats.int` (asymmetric ``s·(q − z)``, or symmetric ``s·q``;
bit balance via ``spec.levels``); only the storage differs. The b-bit code of each weight
is split into b binary planes, packed along K with :func:`bitpack.pack_planes` (whole
64-bit words per group). Codes are unsigned for asymmetric grids and two's complement for
symmetric ones, so that the GEMM's plane weights are ``2^i``, with the MSB plane's
``−2^(b−1)`` for symmetric weights:

  ``W·x = Σ_i Σ_j c_i c_j · popcount(Wplane_i AND Xplane_j)``  per group, then scales.

Stored tensors:
  ``planes`` uint8 ``[b, N, G, 8·⌈g/64⌉]``
  ``scales`` float16 ``[N, G]``
  ``qzeros`` uint8 ``[N, ⌈G·b/8⌉]`` (asymmetric only, :mod:`bitpack` layout)
"""

from __future__ import annotations

import torch

from . import bitpack
from . import int as intfmt
from .base import FormatSpec, WeightFormat, effective_group_size, num_groups


def to_twos_complement(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset-binary codes ``q + 2^(b−1)`` (the INT format's symmetric storage) -> b-bit two's complement."""
    return codes ^ (1 << (bits - 1))


class BitplaneFormat(WeightFormat):
    name = "bitplane"
    min_bits = 2
    max_bits = 8

    def packed_layout(self, spec: FormatSpec, shape: tuple[int, int]):
        n, k = shape
        ng = num_groups(spec.group_size, k)
        gb = bitpack.plane_group_bytes(effective_group_size(spec.group_size, k))
        layout = {"planes": ((spec.bits, n, ng, gb), torch.uint8), "scales": ((n, ng), intfmt.SCALE_DTYPE)}
        if not spec.sym:
            layout["qzeros"] = ((n, bitpack.packed_bytes(ng, spec.bits)), torch.uint8)
        return layout

    Parts = intfmt.IntParts

    def pack(self, parts: intfmt.IntParts, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """From INT-format codes (offset binary when symmetric), scales and zeros."""
        codes, scales, zeros = parts
        stored = to_twos_complement(codes, spec.bits) if spec.sym else codes
        out = {"planes": bitpack.pack_planes(stored, spec.bits, spec.group_size),
               "scales": scales.to(intfmt.SCALE_DTYPE)}
        if not spec.sym:
            out["qzeros"] = bitpack.pack(zeros.to(torch.uint8), spec.bits)
        return out

    def unpack(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]):
        """-> INT-format ``(codes, scales, zeros)`` (offset-binary codes when symmetric)."""
        n, k = shape
        codes = bitpack.unpack_planes(packed["planes"], spec.bits, k, spec.group_size)
        scales = packed["scales"].float()
        if spec.sym:
            return intfmt.IntParts(to_twos_complement(codes, spec.bits), scales,
                                   torch.full_like(scales, float(1 << (spec.bits - 1))))
        return intfmt.IntParts(codes, scales, bitpack.unpack(packed["qzeros"], spec.bits, scales.shape[-1]).float())

    def quantize(self, w, spec, shrink=1.0, scales=None, zeros=None):
        if scales is None:
            scales, zeros = intfmt.group_params(w, spec, shrink)
        return self.pack(intfmt.IntParts(intfmt.encode(w, scales, zeros, spec), scales, zeros), spec, tuple(w.shape))

    def dequantize(self, packed, spec, shape):
        return intfmt.decode(*self.unpack(packed, spec, shape), spec)
