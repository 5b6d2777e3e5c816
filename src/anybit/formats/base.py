"""The contract every weight format follows (llama.cpp's quantize / dequantize / dot trio).

A format turns a float weight ``W [N, K]`` (out_features x in_features) into a dict of
*packed* tensors (what is stored on disk and held by :class:`anybit.nn.QuantLinear`) and
back. Groups run along K; ``group_size = -1`` means one group per output row; a K not
divisible by the group size leaves a shorter last group.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..errors import AnybitError


@dataclass(frozen=True)
class FormatSpec:
    """How one weight matrix is quantized: the format's name and its parameters.

    ``levels`` (integer grids only): the number of grid levels when it is not ``2^bits``.
    ABQ-LLM's bit balance ("W2*") is a 2-bit asymmetric grid with ``qmax = 2^2`` (5 levels),
    stored and executed in 3 bits: ``FormatSpec("int", 3, g, levels=5)``.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    levels: int = 0  # 0: 2^bits

    @property
    def qmax(self) -> int:
        """Largest unsigned code of an asymmetric integer grid."""
        return (self.levels or (1 << self.bits)) - 1

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.levels:
            del d["levels"]  # keep configs of plain grids as other tools write them
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FormatSpec":
        """From a checkpoint's or run folder's layer entry (extra keys ignored)."""
        return cls(str(d["format"]), int(d["bits"]), int(d["group_size"]), bool(d["sym"]), int(d.get("levels", 0)))


def effective_group_size(group_size: int, k: int) -> int:
    """The group length along K (``-1`` means the whole row)."""
    return k if group_size == -1 else group_size


def num_groups(group_size: int, k: int) -> int:
    return math.ceil(k / effective_group_size(group_size, k))


def rows_per_chunk(k: int) -> int:
    """Rows of a ``[n, k]`` matrix per pass of the row-blocked loops (quantize, dequantize,
    error sums): ~4M elements, 16 MB per float32 temporary, so large layers stay small."""
    return max(1, (1 << 22) // max(k, 1))


def expand_groups(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Repeat per-group values ``[..., G]`` to per-column values ``[..., K]`` (ragged last group)."""
    g = effective_group_size(group_size, k)
    return t.repeat_interleave(g, dim=-1)[..., :k]


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """View ``w [N, K]`` as ``[N, G, g]`` padded with NaN, and the mask of real entries.

    NaN padding lets per-group reductions ignore the ragged tail (``nanmax`` style) while
    staying vectorised.
    """
    n, k = w.shape
    g = effective_group_size(group_size, k)
    ng = math.ceil(k / g)
    pad = ng * g - k
    wp = torch.nn.functional.pad(w, (0, pad), value=float("nan")) if pad else w
    wp = wp.reshape(n, ng, g)
    return wp, ~torch.isnan(wp)


class WeightFormat(ABC):
    """One number format: quantize (float -> packed), dequantize (packed -> float), bits."""

    name: ClassVar[str]
    min_bits: ClassVar[int]
    max_bits: ClassVar[int]

    def validate(self, spec: FormatSpec, k: int | None = None) -> None:
        """Raise :class:`AnybitError` for an impossible spec (bits, group size)."""
        if not self.min_bits <= spec.bits <= self.max_bits:
            raise AnybitError(
                f"{self.name} weights support {self.min_bits}..{self.max_bits} bits, got {spec.bits}; "
                f"choose --wbits between {self.min_bits} and {self.max_bits}"
            )
        if spec.group_size != -1 and spec.group_size < 1:
            raise AnybitError(
                f"group size must be -1 (per output channel) or a positive integer, got {spec.group_size}"
            )
        if spec.levels and not (spec.format in ("int", "bitplane") and not spec.sym
                                and (1 << (spec.bits - 1)) < spec.levels <= (1 << spec.bits)):
            raise AnybitError(f"{spec.levels} grid levels do not fit an asymmetric {spec.bits}-bit "
                              f"{spec.format} grid; bit balance needs an asymmetric integer format")

    # the named parts a packed weight holds (a NamedTuple: codes, scales, ...), what
    # :meth:`unpack` returns and :meth:`pack` takes, so that pack(unpack(p)) == p
    Parts: type = tuple

    @abstractmethod
    def pack(self, parts: tuple, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The packed tensors (:meth:`packed_layout`) of ``parts`` (a :attr:`Parts`) of a ``shape`` weight."""

    @abstractmethod
    def unpack(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]) -> tuple:
        """The :attr:`Parts` of packed tensors (bit packing undone)."""

    @abstractmethod
    def quantize(self, w: torch.Tensor, spec: FormatSpec, **options) -> dict[str, torch.Tensor]:
        """Quantize ``w [N, K]`` and return its packed tensors."""

    @abstractmethod
    def dequantize(self, packed: dict[str, torch.Tensor], spec: FormatSpec, shape: tuple[int, int]) -> torch.Tensor:
        """Reconstruct the float32 weight ``[N, K]`` from packed tensors."""

    @abstractmethod
    def packed_layout(self, spec: FormatSpec, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every packed tensor, for empty modules and checkpoint checks."""

    def bits_per_weight(self, spec: FormatSpec, shape: tuple[int, int]) -> float:
        """Stored bits (codes + scales + zeros, all counted) per weight."""
        total = 0
        for shp, dtype in self.packed_layout(spec, shape).values():
            total += math.prod(shp) * torch.empty((), dtype=dtype).element_size() * 8
        return total / (shape[0] * shape[1])
