"""Evaluation: perplexity, KL divergence, greedy generation."""

from .perplexity import EvalResult, generate, perplexity

__all__ = ["EvalResult", "generate", "perplexity"]
