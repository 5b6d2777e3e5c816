"""glibc malloc knobs, set by the parts of the pipeline whose allocation pattern needs them
(each a no-op where the C library lacks the call)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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


_MADV_DONTNEED = 4
_PAGE = 4096


def _file_private_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's private (copy-on-write) file mappings."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1][3] == "p" and parts[5].strip().startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def drop_file_pages(tensors) -> int:
    """Drop the resident pages of tensors that are private memory maps of a file (the
    checkpoint's packed weights: io.checkpoint.read_safetensors_mmap) and return how many
    bytes were released. Their contents stay valid: a later read faults the pages in again
    from the file. Tensors in anonymous memory (made in this process) are never touched
    (``MADV_DONTNEED`` would zero them); neither is a map whose pages were written (it is
    only called on packed weights nothing writes). Used once a kernel has its own copy of a
    layer in another layout, so that a loaded model does not keep both resident."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return 0
    maps = None
    freed = 0
    for t in tensors:
        if t is None or t.numel() == 0 or t.device.type != "cpu":
            continue
        start = t.untyped_storage().data_ptr()
        end = start + t.untyped_storage().nbytes()
        if maps is None:
            maps = _file_private_maps()
        m = next(((lo, hi) for lo, hi in maps if lo <= start and end <= hi), None)
        if m is None:
            continue
        a = max(m[0], start & ~(_PAGE - 1))  # whole pages: the map is this tensor's alone
        b = min(m[1], (end + _PAGE - 1) & ~(_PAGE - 1))
        if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
            freed += b - a
    return freed


def available_memory() -> int | None:
    """Bytes the kernel could give this process now (``MemAvailable``; None where unknown).
    ``ANYBIT_MEM_AVAILABLE_GIB`` overrides it (tests; a budget below the machine's)."""
    forced = os.environ.get("ANYBIT_MEM_AVAILABLE_GIB")
    if forced:
        return int(float(forced) * (1 << 30))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
