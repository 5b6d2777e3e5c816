"""Number formats: one module per format, each a :class:`WeightFormat`; registered here."""

from __future__ import annotations

from ..errors import AnybitError
from .activation import ActSpec
from .base import FormatSpec, WeightFormat
from .bcq import BCQFormat, BCQHalfOffsetFormat
from .bitplane import BitplaneFormat
from .int import IntFormat
from .pot import PoTFormat, PoTZeroFormat

FORMATS: dict[str, WeightFormat] = {
    "int": IntFormat(),
    "bcq": BCQFormat(),
    "bcq16": BCQHalfOffsetFormat(),
    "pot": PoTFormat(),
    "potz": PoTZeroFormat(),
    "bitplane": BitplaneFormat(),
}


def get_format(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise AnybitError(f"unknown weight format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


__all__ = ["ActSpec", "FORMATS", "FormatSpec", "WeightFormat", "get_format"]
