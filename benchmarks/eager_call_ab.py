"""A/B of an eager QuantLinear call with and without its prepared native call (native.FastLinear).

``module(x)`` outside the native decoding step (``bench kernels``, prefill and evaluation through
``transformers``, a user's own loop) goes through ``kernels.linear``. Without the prepared call
every call runs the full dispatch (backend choice, predicates, the layout cache's lookup,
reshapes, ~16 ctypes arguments); with it, a few checks and one call with the layout's struct.
Both are timed in one process, in alternating rounds, on the same cold rotation of distinct
matrices (``bench kernels``' protocol: >= 4x the last-level cache), after checking that they give
the same outputs. A third column, "bare", calls the prepared call's C entry point directly
(``anybit_lin_rows`` on its struct, no Python in between): prepared − bare is what the Python
side of an eager call costs. Nothing else may run meanwhile.

    python benchmarks/eager_call_ab.py --shapes 576x576,576x1536,1536x576,4096x4096 --batches 1,16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from anybit import kernels
from anybit.bench import CASES, copies_for_cold, packed_bytes, random_module
from anybit.formats import ActSpec
from anybit.kernels import native

NAMES = {"int4": ("int", 4, 16), "int3": ("int", 3, 16), "int8": ("int", 8, 16), "pot3": ("pot", 3, 16),
         "potz3": ("potz", 3, 16), "bcq3": ("bcq", 3, 16), "bitplane6a6": ("bitplane", 6, 6),
         "bitplane4a8": ("bitplane", 4, 8)}


def case_of(name: str):
    fmt, bits, abits = NAMES[name]
    for c in CASES:
        if c[:3] == (fmt, bits, abits):
            return c
    raise SystemExit(f"no case {name} in anybit.bench.CASES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="576x576,576x1536,1536x576,4096x4096")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--formats", default="int4,int3,pot3,bcq3,bitplane6a6")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, ISA {native.isa()}; ms per call, median of "
          f"{args.rounds} alternating rounds; full: the full dispatch, prepared: FastLinear, bare: its C call")
    print("| format | shape | batch | full (ms) | prepared (ms) | bare (ms) | prepared / full | same outputs |")
    print("|---|---|---|---|---|---|---|---|")
    limits = (native.MAX_ROWS, native.MAX_ROWS_BITPLANE)
    for name in args.formats.split(","):
        fmt, bits, abits, sym, agroup, asym = case_of(name)
        for shape_s in args.shapes.split(","):
            n, k = (int(v) for v in shape_s.split("x"))
            act = ActSpec(abits, args.group_size if agroup == "w" else -1, asym) if abits < 16 else ActSpec()
            first = random_module(fmt, bits, (n, k), args.group_size, sym, act, gen)
            mods = [first] + [random_module(fmt, bits, (n, k), args.group_size, sym, act, gen)
                              for _ in range(copies_for_cold(packed_bytes(first)) - 1)]
            for batch in (int(b) for b in args.batches.split(",")):
                native.MAX_ROWS = native.MAX_ROWS_BITPLANE = max(batch, limits[0])  # the kernels, not BLAS
                x = torch.randn(batch, k, generator=gen)
                times: dict[str, list[float]] = {"full": [], "prepared": [], "bare": []}
                outs = {}
                reps = max(20, 4 * len(mods))
                y = torch.empty(batch, n)
                with kernels.use("native"):
                    for _ in range(args.rounds):
                        for side in times:
                            native.FAST_LINEAR = side != "full"
                            for m in mods:  # warm-up: (re)builds the prepared calls outside the timing
                                m(x)
                            outs[side != "full"] = first(x)
                            if side == "bare":  # the prepared calls' structs, as FastLinear passes them
                                calls = [m.__dict__["_anybit_fast"][1] for m in mods]
                                args_of = [(c.addr, x.data_ptr(), batch, y.data_ptr(),
                                            c.st.threads if batch == 1 else native._threads(batch * n * k))
                                           for c in calls]
                                lin_rows = native._lib.anybit_lin_rows
                                t0 = time.perf_counter()
                                for i in range(reps):
                                    lin_rows(*args_of[i % len(mods)])
                            else:
                                t0 = time.perf_counter()
                                for i in range(reps):
                                    mods[i % len(mods)](x)
                            times[side].append((time.perf_counter() - t0) / reps * 1e3)
                native.FAST_LINEAR = True
                full, fast, bare = (statistics.median(times[s]) for s in ("full", "prepared", "bare"))
                print(f"| {name} | {n}x{k} | {batch} | {full:.3f} | {fast:.3f} | {bare:.3f} | {fast / full:.3f} | "
                      f"{'yes' if torch.equal(outs[False], outs[True]) else 'NO'} |", flush=True)
            del mods, first
    native.MAX_ROWS, native.MAX_ROWS_BITPLANE = limits


if __name__ == "__main__":
    main()
