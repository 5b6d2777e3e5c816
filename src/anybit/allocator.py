"""glibc malloc knobs, set by the parts of the pipeline whose allocation pattern needs them
(each a no-op where the C library lacks the call)."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks instead of returning them to the OS.

    A training step allocates and frees hundreds of 1-16 MB tensors; with glibc's defaults
    each one is a fresh ``mmap`` whose pages fault in on first touch, which made the
    elementwise work of a step 2-5x slower than the arithmetic (measured in
    docs/training.md). Raising the mmap threshold to its maximum (32 MiB) and the trim
    threshold to 512 MiB keeps them on the heap. Process-wide.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    libc = _libc()
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20)
    except AttributeError:
        pass


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``).

    Streaming quantization frees one block's tensors before reading the next; glibc's
    dynamic mmap threshold rises after the first large free, so later temporaries of up to
    32 MiB come from the heap, and its free pages stayed resident: peak RSS grew ~0.1 GB per
    4096-wide block (docs/streaming.md). Called after each streamed block."""
    libc = _libc()
    try:
        libc.malloc_trim(0)
    except AttributeError:
        pass
