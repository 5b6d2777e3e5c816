"""Where a prefill that dequantizes and calls BLAS spends its time, against the fp32 model's BLAS.

A prompt's rows above a format's kernel limit (BCQ: ``BCQ_MAX_ROWS``; INT/PoT: the int8
kernel's) run as: dequantize into a shared scratch weight, then ``F.linear``. Per SmolLM2 shape
(and the fused Q/K/V and gate/up shapes of the decoder's plans), at ``--rows`` activation rows:
fp32 ``F.linear`` on a resident weight (what the fp32 model does), the dequantize kernel
alone, the dequantize + BLAS linear, and, for BCQ, the LUT-GEMM at these rows (medians,
``anybit.bench.median_time``).

    python benchmarks/prefill_split.py --format bcq --bits 3 --rows 128 --threads 2
    python benchmarks/prefill_split.py --format bcq --rows 16,64,128,256,512 --shapes smollm2,fused,4096

Nothing else may run meanwhile (two cores).
"""
from __future__ import annotations

import argparse

import torch

import anybit.kernels as K
from anybit.bench import median_time
from anybit.formats import FormatSpec
from anybit.kernels import native
from anybit.nn import QuantLinear

SHAPES = {"smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],  # q/o, k/v, gate/up, down (out x in)
          "fused": [(960, 576), (3072, 576)],  # SmolLM2's Q/K/V and gate/up as one call (BCQPlan)
          "4096": [(4096, 4096)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="bcq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rows", default="128", help="activation rows, comma-separated")
    ap.add_argument("--shapes", default="smollm2", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = FormatSpec(args.format, args.bits, args.group_size, False)
    deq = native.bcq_dequantize if args.format == "bcq" else native.dequantize
    bcq = spec.format == "bcq"
    print(f"{spec.format} W{spec.bits} g{spec.group_size}, {args.threads} threads")
    for n, k in [sh for name in args.shapes.split(",") for sh in SHAPES[name]]:
        lin = torch.nn.Linear(k, n, bias=False)
        q = QuantLinear.from_linear(lin, spec)
        w = lin.weight.detach().contiguous()
        scratch = native._scratch_weight(n, k)
        t_dq = median_time(lambda: deq(q, out=scratch)) * 1e3
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            t_fp = median_time(lambda: torch.nn.functional.linear(x, w)) * 1e3
            own = native.BCQ_MAX_ROWS
            try:
                native.BCQ_MAX_ROWS = 0  # every row count: dequantize + BLAS
                t_q = median_time(lambda: K.linear(x, q)) * 1e3
                native.BCQ_MAX_ROWS = 1 << 30  # every row count: the LUT-GEMM
                t_lut = median_time(lambda: K.linear(x, q)) * 1e3 if bcq else None
            finally:
                native.BCQ_MAX_ROWS = own
            lut = f" | LUT-GEMM {t_lut:.3f} ms ({t_lut / t_fp:.2f}x)" if bcq else ""
            print(f"{n}x{k}, {rows} rows: fp32 F.linear {t_fp:.3f} ms | dequantize {t_dq:.3f} ms "
                  f"({t_dq / t_fp:.2f} of it) | {'dequantize + BLAS' if bcq else 'quantized linear'} {t_q:.3f} ms "
                  f"({t_q / t_fp:.2f}x){lut}")

if __name__ == "__main__":
    main()
