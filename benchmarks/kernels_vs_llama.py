"""anybit's batch-1 GEMV against llama.cpp's (ggml's mul_mat) at the nearest type, cold, in one
process and in alternating rounds.

`anybit bench kernels --against llama.cpp` times each row at its own moment, so on a host whose
memory speed moves by half within minutes two rows of one table can differ by the drift alone.
Here every pair (an anybit format, a ggml type) is timed round by round, each entry on its own
distinct matrices cycled (≥ 4× the last-level cache, `bench.copies_for_cold`), through the
prepared native call (anybit: ``FastLinear``'s struct through ctypes; ggml: a prebuilt graph
and plan per matrix), with the streaming read bandwidth measured before and after. Needs the
bench extra (``pip install -e '.[bench]'``); nothing else may run meanwhile.

    python benchmarks/kernels_vs_llama.py --pairs int2=Q2_K,int3=Q3_K,int4=Q4_K,int6=Q6_K,pot3=Q3_K
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from anybit.bench import copies_for_cold, read_bandwidth
from anybit.kernels import native
from anybit.peers import llama_cpp
from roofline import cold_calls


def ours(name: str, n: int, k: int, group: int, threads: int, gen: torch.Generator):
    """A pass over distinct copies of an anybit layer ``name`` (a `bench kernels` format name):
    (run, calls per pass, weight bytes)."""
    mods, calls, x, y, nbytes = cold_calls(name, n, k, group, gen)
    lib = native._lib

    def run() -> None:
        for c in calls:
            lib.anybit_lin_rows(c.addr, x.data_ptr(), 1, y.data_ptr(), threads)

    run.keep = (mods, x, y)
    return run, len(calls), nbytes


def theirs(type_name: str, n: int, k: int, threads: int):
    """The same for ggml's ``type_name``: (run, calls per pass, weight bytes)."""
    base, _ = llama_cpp._load()
    nbytes = base.ggml_row_size(llama_cpp.GGML_TYPES[type_name], k) * n
    mm = llama_cpp.MulMat(type_name, n, k, 1, copies_for_cold(nbytes), threads)

    def run() -> None:
        for _ in range(len(mm.graphs)):
            mm()

    run.keep = mm
    return run, len(mm.graphs), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="int2=Q2_K,int3=Q3_K,int4=Q4_K,int4=Q4_0,int6=Q6_K,pot3=Q3_K,bitplane6a6=Q6_K")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="out x in, comma-separated")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    why = llama_cpp.unavailable()
    if why:
        raise SystemExit(f"error: llama.cpp is not available ({why}); install the bench extra: pip install -e '.[bench]'")
    pairs = [p.split("=") for p in args.pairs.split(",")]
    print(f"{native.isa()}, {args.threads} threads, batch 1, cold; medians of {args.rounds} alternating rounds")
    print()
    print("| out × in | anybit | ms | GB/s | llama.cpp | ms | GB/s | anybit ÷ llama.cpp time | read GB/s (before, after) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        entries = {}
        for a, b in pairs:
            key_a, key_b = ("anybit", a), ("llama.cpp", b)
            if key_a not in entries:
                entries[key_a] = ours(a, n, k, args.group_size, args.threads, gen)
            if key_b not in entries and llama_cpp.supports(b, k):
                entries[key_b] = theirs(b, n, k, args.threads)
        bw0 = read_bandwidth()
        times = {key: [] for key in entries}
        for _ in range(args.rounds):
            for key, (run, calls, _) in entries.items():
                t = time.perf_counter()
                for _ in range(3):
                    run()
                times[key].append((time.perf_counter() - t) / (3 * calls))
        bw1 = read_bandwidth()
        med = {key: statistics.median(v) for key, v in times.items()}
        for a, b in pairs:
            (ta, ba), kb = (med[("anybit", a)], entries[("anybit", a)][2]), ("llama.cpp", b)
            if kb not in med:
                continue
            tb, bb = med[kb], entries[kb][2]
            print(f"| {n}×{k} | {a} | {ta * 1e3:.3f} | {ba / ta / 1e9:.1f} | {b} | {tb * 1e3:.3f} | {bb / tb / 1e9:.1f} | "
                  f"{ta / tb:.2f} | {bw0:.1f}, {bw1:.1f} |", flush=True)
        entries.clear()


if __name__ == "__main__":
    main()
