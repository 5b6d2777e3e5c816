"""Saving and loading quantized models."""

from .checkpoint import inspect, load, save

__all__ = ["inspect", "load", "save"]
