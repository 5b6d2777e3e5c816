"""The native float32 GEMM (``native.f32_linear``: kind 4 of the native kernels, register tiles of
inner products) against PyTorch's ``F.linear`` (MKL in the pinned CPU wheel) on the same inputs, in
one process, alternating rounds; what ``native.F32_GEMM_ROWS`` (the rows up to which a float
model's prompt takes the native GEMM) was chosen from. Weights of the 4096 shapes (64-180 MB)
are read from memory on every call; SmolLM2's stay in the caches. Nothing else may run meanwhile.

    python benchmarks/f32_gemm.py --rows 4,16,64,128,512 --threads 2
"""
from __future__ import annotations

import argparse
import ctypes
import time

import torch
import torch.nn.functional as F

from anybit.kernels import native

SHAPES = "4096x4096,11008x4096,4096x11008,576x576,1536x576,576x1536"


def best_time(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="4,16,64,128,512")
    ap.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads, ISA {native.isa()}; best of {args.rounds} alternating rounds")
    print("| rows | out × in | F.linear (ms) | GFLOP/s | native (ms) | GFLOP/s | native / F.linear | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for m in (int(v) for v in args.rows.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            w, b = torch.randn(n, k, generator=gen) * 0.02, torch.randn(n, generator=gen)
            x = torch.randn(m, k, generator=gen)
            y = torch.empty(m, n)
            st = native._f32_weight_struct(w, b)

            def ours():
                native._lib.anybit_lin_rows(ctypes.byref(st), x.data_ptr(), m, y.data_ptr(), args.threads)

            def blas():
                return F.linear(x, w, b)

            ours()
            ref = blas()
            diff = ((y - ref).abs().max() / ref.abs().max()).item()
            reps = 3 if m * n * k > 1e9 else 20
            times = {"blas": [], "ours": []}
            for _ in range(args.rounds):
                times["blas"].append(best_time(blas, reps))
                times["ours"].append(best_time(ours, reps))
            tb, to = min(times["blas"]), min(times["ours"])
            fl = 2 * m * n * k / 1e9
            print(f"| {m} | {n}×{k} | {tb * 1e3:.3f} | {fl / tb:.0f} | {to * 1e3:.3f} | {fl / to:.0f} | {to / tb:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
