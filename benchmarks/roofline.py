"""What bounds each format's batch-1 GEMV: its compute roof against the memory's read bandwidth.

For each format, the prepared native call (``FastLinear``'s struct, called straight through
ctypes: no Python per call) is timed

* hot, on one thread, on one matrix that stays in the caches (``--hot-shape``): the rate at which
  one core unpacks and multiplies weight bytes when memory is not in the way; times the threads,
  the most the kernel could reach with every core busy (its compute roof, in GB/s of weight
  bytes; a lower bound where the matrix only fits L3);
* cold, on ``--threads`` threads, on distinct copies of ``--shape`` cycled so that every call
  reads its weights from memory (``bench kernels``' protocol): what it reaches.

The streaming read bandwidth (``bench.read_bandwidth``, a float32 sum) is measured before and
after. A format whose compute roof is below the read bandwidth cannot reach it however its
memory access is arranged (bound: compute); one whose roof is above it but whose cold rate
falls short loses to how its accesses overlap (bound: memory access). Weight bytes are those of
the packed tensors (the kernel's own layout holds the same codes and scales). Nothing else may
run meanwhile.

    python benchmarks/roofline.py --formats int2,int3,int4,int6,int8,pot3,bcq3,bitplane4a8,bitplane6a6
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from anybit import kernels
from anybit.bench import CASES, case_name, copies_for_cold, packed_bytes, random_module, read_bandwidth
from anybit.formats import ActSpec
from anybit.kernels import native


def prepared(m, x: torch.Tensor):
    """The module's FastLinear after a first call (its layout built)."""
    with kernels.use("native"):
        m(x)
        m(x)
    fast = m.__dict__.get("_anybit_fast")
    if fast is None:
        raise SystemExit(f"error: no prepared native call for {m.extra_repr()}")
    return fast[1]


def cold_calls(name: str, n: int, k: int, group: int, gen: torch.Generator, cold: bool = True):
    """Random layers of the `bench kernels` format ``name`` (``[n, k]``, weight group ``group``):
    distinct copies enough to be read from memory on every call (``cold``; else one), each with
    its prepared native call. Returns (modules, calls, x ``[1, k]``, y ``[1, n]``, weight bytes of one)."""
    names = {case_name(c): c for c in CASES}
    if name not in names:
        raise SystemExit(f"error: unknown format {name}; choose from {', '.join(names)}")
    fmt, bits, abits, sym, agroup, asym = names[name]
    act = ActSpec(abits, group if agroup == "w" else -1, asym) if abits < 16 else ActSpec()
    first = random_module(fmt, bits, (n, k), group, sym, act, gen)
    copies = copies_for_cold(packed_bytes(first)) if cold else 1
    mods = [first] + [random_module(fmt, bits, (n, k), group, sym, act, gen) for _ in range(copies - 1)]
    x, y = torch.randn(1, k, generator=gen), torch.empty(1, n)
    return mods, [prepared(m, x) for m in mods], x, y, packed_bytes(first)


def rate(calls, x: torch.Tensor, y: torch.Tensor, threads: int, nbytes: int, rounds: int, reps: int) -> float:
    """GB/s of weight bytes: the median over rounds of ``reps`` passes over ``calls``."""
    lib = native._lib
    xp, yp = x.data_ptr(), y.data_ptr()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            for c in calls:
                lib.anybit_lin_rows(c.addr, xp, 1, yp, threads)
        times.append((time.perf_counter() - t) / (reps * len(calls)))
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int2,int3,int4,int6,int8,pot3,bcq3,bitplane2a8,bitplane4a8,bitplane6a6,bitplane6a8")
    ap.add_argument("--shape", default="4096x4096", help="out x in of the cold matrices")
    ap.add_argument("--hot-shape", default="512x4096",
                    help="out x in of the hot matrix (in L2 up to 4 bits, in L3 beyond, with 1 MB L2 per core)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    gen = torch.Generator().manual_seed(0)
    bw0 = read_bandwidth()
    rows = []
    for name in args.formats.split(","):
        rates = {}  # cold? -> GB/s
        for shape, cold in ((args.hot_shape, False), (args.shape, True)):
            n, k = (int(v) for v in shape.split("x"))
            mods, calls, x, y, nbytes = cold_calls(name, n, k, args.group_size, gen, cold)
            threads = args.threads if cold else 1
            reps = 3 if cold else 200
            rates[cold] = rate(calls, x, y, threads, nbytes, args.rounds, reps)
        rows.append((name, 8 * nbytes / (n * k), rates[False], rates[True]))
    bw1 = read_bandwidth()
    bw = (bw0 + bw1) / 2
    print(f"{native.isa()}, {args.threads} threads; cold {args.shape}, hot {args.hot_shape} on one thread; "
          f"streaming read {bw0:.1f} GB/s before, {bw1:.1f} after; medians of {args.rounds} rounds")
    print()
    print(f"| format | bits/weight | hot, 1 thread (GB/s) | compute roof ×{args.threads} | cold, {args.threads} threads "
          f"(GB/s) | cold / read | cold / min(roof, read) | bound |")
    print("|---|---|---|---|---|---|---|---|")
    for name, bpw, hot, cold in rows:
        roof = hot * args.threads
        bound = "compute" if roof < bw else "memory access"
        print(f"| {name} | {bpw:.2f} | {hot:.1f} | {roof:.1f} | {cold:.1f} | {cold / bw:.0%} | "
              f"{cold / min(roof, bw):.0%} | {bound} |")


if __name__ == "__main__":
    main()
