"""Compare quantization methods on one model with one calibration and one evaluation
setting (the same for every row). One JSON object per row on stdout.

    python benchmarks/methods_compare.py --model stories260k \
        --calib ../shared/data/corpora/other/stories260k-generated.train.txt --nsamples 32 --seqlen 256 \
        --eval ../shared/data/corpora/other/stories260k-generated.test.txt --eval-seqlen 256 \
        --rows fp,rtn:W3A16G32,gptq:W3A16G32,gptqt:W3A16G32:intermediate_bits=6

A row is ``method:SCHEME[:key=value...]`` (options go to QuantConfig.options), or ``fp``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

import anybit
from anybit.data import calibration_windows, eval_windows, load_text
from anybit.eval import perplexity
from anybit.nn import QuantLinear
from anybit.progress import measure


def parse_row(text: str):
    if text == "fp":
        return None
    method, scheme, *opts = text.split(":")
    options = {}
    for o in opts:
        k, v = o.split("=")
        try:
            options[k] = json.loads(v)
        except json.JSONDecodeError:
            options[k] = v
    s = anybit.parse_scheme(scheme)
    return anybit.QuantConfig(method=method, wbits=s.wbits, abits=s.abits, group_size=s.group_size or 128,
                              bit_balance=s.bit_balance, options=options)


def bits_per_weight(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers) / \
        sum(m.in_features * m.out_features for m in layers)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--rows", required=True)
    args = ap.parse_args()
    print(json.dumps({"meta": {"machine": platform.machine(), "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}}), flush=True)
    lm = anybit.load_model(args.model)
    ctext = load_text(args.calib, "train")
    etext = load_text(args.eval, "test")
    calib = calibration_windows(lm.tokenizer, ctext, args.nsamples, args.seqlen, args.seed)
    windows = eval_windows(lm.tokenizer, etext, args.eval_seqlen, args.max_windows)
    for row in args.rows.split(","):
        cfg = parse_row(row)
        lm = anybit.load_model(args.model)
        rec = {"row": row, "model": args.model, "calib": f"{ctext.description} {args.nsamples}x{args.seqlen} seed {args.seed}"}
        try:
            if cfg is not None:
                with measure() as m:
                    anybit.quantize(lm.model, cfg, calib, progress=False)
                rec.update(quantize_s=round(m.seconds, 1), peak_rss_mib=round(m.peak_rss_mib),
                           bits_per_weight=round(bits_per_weight(lm.model), 3))
            res = perplexity(lm.model, windows, dataset=etext.name, progress=False)
        except Exception as e:  # one failing row must not lose the others
            rec.update(error=f"{e.__class__.__name__}: {e}")
            print(json.dumps(rec), flush=True)
            continue
        rec.update(eval=etext.name, eval_seqlen=res.seqlen, windows=res.windows, tokens=res.tokens, ppl=round(res.ppl, 3))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
