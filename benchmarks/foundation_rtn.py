"""RTN on a real model: perplexity of fp32 and RTN schemes, with time and peak memory
of each step (load, quantize, eval). One JSON object per line on stdout.

    python benchmarks/foundation_rtn.py --model smollm2-135m --dataset wikitext2 --seqlen 2048 \
        --schemes W4A16G128,W3A16G128,W2A16G64

Peak memory is the process's peak resident set size (RSS) sampled during the step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

import anybit
from anybit.data import eval_windows, load_text
from anybit.eval import perplexity
from anybit.progress import measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--schemes", default="W4A16G128,W3A16G128,W2A16G64")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--no-fp", action="store_true", help="skip the fp32 row")
    args = ap.parse_args()

    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    print(json.dumps({"meta": meta}), flush=True)
    rows = ([] if args.no_fp else [None]) + [anybit.parse_scheme(s) for s in args.schemes.split(",")]
    windows = None
    for scheme in rows:
        with measure() as m_load:
            lm = anybit.load_model(args.model)
        if windows is None:
            text = load_text(args.dataset, "test")
            windows = eval_windows(lm.tokenizer, text, args.seqlen, args.max_windows)
        row = {"model": args.model, "scheme": "fp32" if scheme is None else str(scheme),
               "load_s": round(m_load.seconds, 2), "load_peak_rss_mib": round(m_load.peak_rss_mib)}
        if scheme is not None:
            cfg = anybit.QuantConfig(method="rtn", wbits=scheme.wbits, group_size=scheme.group_size or 128, sym=args.sym)
            with measure() as m_q:
                anybit.quantize(lm.model, cfg)
            row.update(quantize_s=round(m_q.seconds, 2), quantize_peak_rss_mib=round(m_q.peak_rss_mib),
                       bits_per_weight=round(sum(m.bits_per_weight() * m.in_features * m.out_features
                                                 for m in lm.model.modules() if isinstance(m, anybit.nn.QuantLinear))
                                             / sum(m.in_features * m.out_features for m in lm.model.modules()
                                                   if isinstance(m, anybit.nn.QuantLinear)), 4))
        with measure() as m_e:
            res = perplexity(lm.model, windows, dataset=args.dataset, progress=False)
        row.update(dataset=res.dataset, seqlen=res.seqlen, windows=res.windows, tokens=res.tokens,
                   ppl=round(res.ppl, 4), eval_s=round(m_e.seconds, 1), eval_peak_rss_mib=round(m_e.peak_rss_mib))
        print(json.dumps(row), flush=True)
        del lm


if __name__ == "__main__":
    main()
