"""Bit packing, kept apart from the number formats' math (as in HQQ's ``bitpack.py``).

Layout (the one place it is defined): a tensor of b-bit unsigned codes ``[..., K]`` is
packed row by row into ``ceil(K*b/8)`` bytes. Each row is a little-endian bit stream:
code ``j`` occupies stream bits ``[j*b, (j+1)*b)`` (its least significant bit first),
and stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``. The tail of the last byte is
zero. Any b in 1..8 and any K work, so ragged rows (K = 172) need no padding rules.
"""

from __future__ import annotations

import math

import torch


def packed_bytes(k: int, bits: int) -> int:
    """Bytes one packed row of ``k`` codes of ``bits`` bits takes."""
    return math.ceil(k * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (values < 2**bits) along the last dim into uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = codes.to(torch.uint8)
    *lead, k = codes.shape
    if bits == 8:
        return codes.contiguous()
    nbytes = packed_bytes(k, bits)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, plain shifts
        per = 8 // bits
        pad = nbytes * per - k
        c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
        c = c.reshape(*lead, nbytes, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (c << shifts).sum(-1, dtype=torch.uint8)
    # general b: expand to the bit stream, then regroup by 8
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, k * bits)
    pad = nbytes * 8 - k * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*lead, nbytes, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., ceil(k*bits/8)]`` to uint8 codes ``[..., k]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, nbytes = packed.shape
    if nbytes != packed_bytes(k, bits):
        raise ValueError(f"packed row has {nbytes} bytes, expected {packed_bytes(k, bits)} for {k} codes of {bits} bits")
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        c = (packed.unsqueeze(-1) >> shifts) & mask
        return c.reshape(*lead, nbytes * (8 // bits))[..., :k]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, nbytes * 8)[..., : k * bits]
    stream = stream.reshape(*lead, k, bits)
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream << bit_idx).sum(-1, dtype=torch.uint8)


# Bit-planes (the layout of the AND+popcount GEMM, SPEC §2): plane ``i`` holds bit ``i`` of every
# code. Each group of ``g`` codes along K starts a fresh run of whole 64-bit words (little
# endian, padding bits 0), so a group's popcounts never mix with its neighbour's and any
# group size, ragged last group included, works with word-wide AND + popcount.
WORD_BITS = 64


def plane_group_bytes(group_len: int) -> int:
    """Bytes one group of ``group_len`` codes takes in one plane (whole 64-bit words)."""
    return math.ceil(group_len / WORD_BITS) * (WORD_BITS // 8)


def pack_planes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Unsigned ``codes [..., K]`` (< 2**bits) -> uint8 planes ``[bits, ..., G, plane_group_bytes(g)]``."""
    *lead, k = codes.shape
    g = k if group_size == -1 else group_size
    ng = math.ceil(k / g)
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, ng * g - k)).reshape(*lead, ng, g)
    c = torch.nn.functional.pad(c, (0, plane_group_bytes(g) * 8 - g))
    return torch.stack([pack((c >> i) & 1, 1) for i in range(bits)])


def unpack_planes(planes: torch.Tensor, bits: int, k: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: uint8 codes ``[..., K]``."""
    g = k if group_size == -1 else group_size
    nbytes = planes.shape[-1]
    codes = None
    for i in range(bits):
        b = unpack(planes[i], 1, nbytes * 8)[..., :g] << i
        codes = b if codes is None else codes | b
    return codes.reshape(*codes.shape[:-2], -1)[..., :k]
