"""Evaluation and calibration text."""

from .text import DATASETS, PYDOC, Text, load_text
from .tokens import calibration_windows, eval_windows, tokenize

__all__ = ["DATASETS", "PYDOC", "Text", "calibration_windows", "eval_windows", "load_text", "tokenize"]
