"""Quantized modules."""

from .qlinear import QuantLinear

__all__ = ["QuantLinear"]
