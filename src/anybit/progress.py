"""Progress bars (on stderr, with elapsed/ETA) and time / peak-memory measurement."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bar(it: Iterable[T], desc: str, total: int | None = None, enabled: bool = True, unit: str = "it",
        initial: int = 0) -> "tqdm[T]":
    """A per-step progress bar with elapsed and ETA; silent when disabled or ANYBIT_QUIET=1."""
    disable = not enabled or os.environ.get("ANYBIT_QUIET") == "1"
    return tqdm(it, desc=desc, total=total, disable=disable, file=sys.stderr, unit=unit, dynamic_ncols=True, initial=initial,
                mininterval=0.5)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    # CPU time of the process (all threads): unlike wall time it does not count periods the
    # process was stopped (SIGSTOP) or waited for the cores
    cpu_seconds: float = 0.0

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / 2**20


@contextmanager
def measure(interval: float = 0.05) -> Iterator[Measurement]:
    """Wall time and peak resident memory of the enclosed block (RSS sampled in a thread)."""
    m = Measurement(peak_rss_bytes=_rss_bytes())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            m.peak_rss_bytes = max(m.peak_rss_bytes, _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    t.start()
    try:
        yield m
    finally:
        stop.set()
        t.join()
        m.seconds = time.perf_counter() - t0
        m.cpu_seconds = cpu_seconds() - c0
        m.peak_rss_bytes = max(m.peak_rss_bytes, _rss_bytes())
