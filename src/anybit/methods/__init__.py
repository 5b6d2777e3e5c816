"""Quantization methods: one module per algorithm, registered here."""

from __future__ import annotations

from ..errors import AnybitError
from .abq import ABQ
from .base import LayerReport, Method, MethodResult
from .bcq_fit import BCQFit
from .flexq import FlexQ
from .gptq import GPTQ
from .gptqt import GPTQT
from .potptq import PoTPTQ
from .rtn import RTN
from .smoothquant import SmoothQuant

METHODS: dict[str, Method] = {
    "rtn": RTN(),
    "gptq": GPTQ(),
    "gptqt": GPTQT(),
    "bcq": BCQFit(),
    "potptq": PoTPTQ(),
    "smoothquant": SmoothQuant(),
    "abq": ABQ(),
    "flexq": FlexQ(),
}


def streaming_methods() -> list[str]:
    """Methods that run with ``stream`` (one block of the model in memory at a time)."""
    return [n for n, m in METHODS.items() if m.streams]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise AnybitError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "LayerReport", "Method", "MethodResult", "get_method", "streaming_methods"]
