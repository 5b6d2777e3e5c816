"""Where a prefill that dequantizes and calls BLAS spends its time, against the fp32 model's BLAS.

Formats without an integer kernel at prompt sizes (BCQ at any row count; INT/PoT above the
int8 kernel's rows) run a prompt as: dequantize into a shared scratch weight, then
``F.linear``. Per SmolLM2 shape, at ``--rows`` activation rows: fp32 ``F.linear`` on a resident
weight (what the fp32 model does), the dequantize kernel alone, and the whole quantized linear
(medians, ``anybit.bench.median_time``).

    python benchmarks/prefill_split.py --format bcq --bits 3 --rows 128 --threads 2

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

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down (out x in)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="bcq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = FormatSpec(args.format, args.bits, args.group_size, False)
    deq = native.bcq_dequantize if args.format == "bcq" else native.dequantize
    print(f"{spec.format} W{spec.bits} g{spec.group_size}, {args.rows} rows, {args.threads} threads")
    for n, k in SMOLLM2:
        lin = torch.nn.Linear(k, n, bias=False)
        q = QuantLinear.from_linear(lin, spec)
        x = torch.randn(args.rows, k)
        w = lin.weight.detach().contiguous()
        scratch = native._scratch_weight(n, k)
        t_fp = median_time(lambda: torch.nn.functional.linear(x, w)) * 1e3
        t_dq = median_time(lambda: deq(q, out=scratch)) * 1e3
        t_q = median_time(lambda: K.linear(x, q)) * 1e3
        print(f"{n}x{k}: fp32 F.linear {t_fp:.3f} ms | dequantize {t_dq:.3f} ms ({t_dq / t_fp:.2f} of it) | "
              f"quantized linear {t_q:.3f} ms ({t_q / t_fp:.2f}x the fp32 time)")


if __name__ == "__main__":
    main()
