"""Token windows for evaluation and calibration."""

from __future__ import annotations

import torch

from ..errors import AnybitError
from .text import Text


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text tokenized once (GPTQ's protocol), as a 1-D LongTensor."""
    ids = tokenizer(text.text, return_tensors="pt").input_ids[0]
    return ids


def eval_windows(tokenizer, text: Text, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of the tokenized text, tail dropped."""
    if seqlen < 2:
        raise AnybitError(f"--seqlen must be at least 2, got {seqlen}")
    ids = tokenize(tokenizer, text)
    if text.max_windows is not None:
        ids = ids[: text.max_windows * seqlen]
    n = ids.numel() // seqlen
    if n == 0:
        raise AnybitError(
            f"{text.description} has {ids.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise AnybitError(f"--max-windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(tokenizer, text: Text, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows ``[nsamples, seqlen]`` of the tokenized text.

    The text is tokenized as one stream and window starts are drawn uniformly with a
    ``torch.Generator`` seeded by ``seed`` (same seed, same windows). The text must hold
    at least ``nsamples * seqlen`` tokens, so that the windows can cover distinct text.
    """
    if nsamples < 1 or seqlen < 2:
        raise AnybitError(f"--nsamples must be >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    if not text.text.strip():
        raise AnybitError(f"calibration text {text.description} is empty; give a text with enough tokens")
    ids = tokenize(tokenizer, text)
    need = nsamples * seqlen
    if ids.numel() < need:
        raise AnybitError(
            f"calibration text {text.description} has {ids.numel()} tokens, fewer than "
            f"--nsamples {nsamples} x --seqlen {seqlen} = {need}; give a longer text or lower them"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
