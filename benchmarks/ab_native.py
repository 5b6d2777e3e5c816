"""A/B of two builds of the native kernels in one process, on the same matrices and activations.

Kernel changes of a few percent drown in the drift between two runs on a shared CPU; here both
builds are loaded side by side (the other one from a copy of its shared library) and timed in
alternating rounds on identical inputs, after checking that they give the same outputs.

    git worktree add /tmp/base REV && (cd /tmp/base && python setup.py build_ext --inplace)
    cp /tmp/base/src/anybit/kernels/_native*.so /tmp/base_native.so
    python benchmarks/ab_native.py /tmp/base_native.so int:3:4096:4096 pot:3:4096:4096:128 \\
        --threads 1 --rows 1 --rounds 9

Each case is ``format:bits:out:in[:group]`` (group 128 by default); bit-plane cases name weight
and activation bits as ``bitplane:6a6:4096:4096``, quantized as `anybit bench kernels` does;
``f32:32:out:in`` is a float32 ``nn.Linear`` on the decoding step's float GEMV (LinStruct kind 4,
``--threads`` threads). Prints the median ms of each build and their ratio (this build over the
other); nothing else may run meanwhile.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import types

import torch

import anybit.kernels as K
import anybit.kernels.native as native
from anybit.bench import CASES
from anybit.formats import FormatSpec
from anybit.formats.activation import ActSpec
from anybit.nn import QuantLinear


def load_other(path: str):
    """The native library at ``path``, loaded next to this build's through the same binding code."""
    own = native._load()
    if own is None:
        sys.exit("error: this build has no native kernels; run `python setup.py build_ext --inplace` first")
    copy = tempfile.NamedTemporaryFile(suffix=".so", delete=False).name  # a new inode: dlopen loads it anew
    shutil.copyfile(path, copy)
    find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: (types.SimpleNamespace(origin=copy) if name == "anybit.kernels._native"
                                                 else find_spec(name, *a))
    try:
        native._lib, native._load_error = None, None
        other = native._load()
    finally:
        importlib.util.find_spec = find_spec
        native._lib = own
        os.unlink(copy)  # the loaded library stays mapped
    if other is None:
        sys.exit(f"error: could not load {path}: {native._load_error}")
    return own, other


def f32_call(lin: torch.nn.Linear, threads: int):
    """``x -> y`` through the float32 GEMV kind of the decoding step (whichever library
    ``native._lib`` is at the call), on ``threads`` threads."""
    import ctypes

    st = native._f32_struct(lin)
    st.threads = threads

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], lin.out_features)
        native._lib.anybit_lin_rows(ctypes.byref(st), x.data_ptr(), x.shape[0], y.data_ptr(), threads)
        return y

    call.keep = lin  # the struct points into its weight
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", help="the other build's _native*.so (a copy of it is loaded), or `nogfni`: "
                    "this build with its GFNI kernels off (native.set_q8_gfni), or `bcqfloat`: this build's "
                    "float-table BCQ kernel against its int8-table one (anybit_set_bcq_int8), or `bcqvnni`: its vpshufb "
                    "BCQ kernel against the vpermb + vpdpbusd one (native.set_bcq_mode), or `tile4`: the 4-row 512-bit int8 tile "
                    "against the rows-in-lanes kernel (native.set_q8_rows16; each with its own layout)")
    ap.add_argument("cases", nargs="+", help="format:bits:out:in[:group], e.g. int:3:4096:4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1: GEMV)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--copies", type=int, default=1, help="distinct matrices cycled (1: hot)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.other == "nogfni":  # this build with its GFNI kernels off against on
        if not native.has_gfni():
            sys.exit("error: this CPU has no GFNI")
        own = native._load()
        builds = {"other": lambda: native.set_q8_gfni(False), "this": lambda: native.set_q8_gfni(True)}
    elif args.other == "bcqfloat":  # this build's BCQ LUT-GEMM with float tables against int8 tables
        own = native._load()
        builds = {"other": lambda: native.set_bcq_mode("float"), "this": lambda: native.set_bcq_mode("vpshufb")}
    elif args.other == "bcqvnni":  # this build's BCQ int8 tables by vpshufb against vpermb + vpdpbusd
        if not native.has_vnni():
            sys.exit("error: this CPU has no AVX-512 VNNI")
        own = native._load()
        builds = {"other": lambda: native.set_bcq_mode("vpshufb"), "this": lambda: native.set_bcq_mode("vnni")}
    elif args.other == "tile4":  # this build's 4-row 512-bit int8 tile against its rows-in-lanes kernel
        if native.q8_kernel() != "rows16":
            sys.exit("error: the rows-in-lanes int8 kernel is not in use here (AVX-512 VNNI, ANYBIT_Q8_ROWS16)")
        own = native._load()
        builds = {"other": lambda: native.set_q8_rows16(False), "this": lambda: native.set_q8_rows16(True)}
    else:
        own, other = load_other(args.other)
        builds = {"other": lambda: setattr(native, "_lib", other), "this": lambda: setattr(native, "_lib", own)}
    for case in args.cases:
        fmt, bits, n, k, *g = case.split(":")
        group = int(g[0]) if g else 128
        if fmt == "bitplane":  # bits "WaA": weights and activations as `anybit bench kernels` runs them
            w, a = (int(v) for v in bits.split("a"))
            _, _, _, wsym, agroup, asym = next(c for c in CASES if c[:3] == ("bitplane", w, a))
            spec = FormatSpec(fmt, w, group, wsym)
            act = ActSpec(a, group if agroup == "w" else -1, asym)
        else:
            spec, act = FormatSpec(fmt, int(bits), group, False), None
        x = torch.randn(args.rows, int(k))
        if fmt == "f32":  # the float GEMV of the decoding step, through its prepared struct
            mods = [f32_call(torch.nn.Linear(int(k), int(n), bias=False), args.threads) for _ in range(args.copies)]
            modsets = {"this": mods, "other": mods}
            run = lambda x, m: m(x)  # noqa: E731
        else:
            fit = {"fit": "greedy"} if fmt.startswith("bcq") else {}  # the kernel, not the fit, is timed
            mods = [QuantLinear.from_linear(torch.nn.Linear(int(k), int(n), bias=False), spec, act=act, **fit)
                    for _ in range(args.copies)]
            # tile4 and another build: the layouts may differ, each module caches one: a copy for each
            own_layouts = args.other not in ("nogfni", "bcqfloat", "bcqvnni")
            modsets = {"this": mods, "other": copy.deepcopy(mods) if own_layouts else mods}
            run = K.linear
        outs = {}
        for name, use in builds.items():
            use()
            outs[name] = run(x, modsets[name][0])
        same = torch.equal(outs["this"], outs["other"])
        rel = float((outs["this"] - outs["other"]).abs().max() / outs["other"].abs().max().clamp_min(1e-30))
        reps = max(50, 8 * args.copies)
        times: dict[str, list[float]] = {name: [] for name in builds}
        for _ in range(args.rounds):
            for name, use in builds.items():
                use()
                ms = modsets[name]
                for m in ms:
                    run(x, m)
                t0 = time.perf_counter()
                for i in range(reps):
                    run(x, ms[i % args.copies])
                times[name].append((time.perf_counter() - t0) / reps * 1e3)
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        print(f"{case} rows {args.rows} threads {args.threads}: other {med['other']:.3f} ms, this "
              f"{med['this']:.3f} ms, this/other {med['this'] / med['other']:.3f}"
              f"{'' if same else f'  (outputs differ: max |Δ| {rel:.1e} of max |y|)'}", flush=True)
    native._lib = own


if __name__ == "__main__":
    main()
