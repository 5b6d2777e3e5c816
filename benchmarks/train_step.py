"""Milliseconds per training step of the block-trained methods (PoTPTQ step 2, ABQ-LLM) on
one decoder block of a real model, measured through the public API so that it times
whatever the methods do today.

The model is cut to its first ``--blocks`` decoder blocks and the method runs
``--epochs`` epochs on ``--nsamples`` windows. Both methods call the optimizer's
``zero_grad`` once per training step (one window: forward, backward, update); the
benchmark wraps that call and reports the median and mean time between consecutive calls (forward,
backward and update of one window; the mean also carries per-epoch work such as
PoTPTQ's best-epoch check in older versions).

    ANYBIT_DATA=../shared/data .venv/bin/python benchmarks/train_step.py --model smollm2-135m \
        --seqlen 2048 --nsamples 4 --rows potptq:W3A16G128,abq:W4A4G128,abq:W4A4G128:dc=false

One JSON object per row on stdout (date, machine, threads, command). Time nothing else
while this runs (two cores: see ../shared/MACHINE-NOTES.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import anybit
from anybit.data import calibration_windows, load_text

sys.path.insert(0, str(Path(__file__).parent))
from methods_compare import parse_row  # noqa: E402


def cut(lm, blocks: int):
    layers = lm.model.model.layers
    lm.model.model.layers = layers[:blocks]
    lm.model.config.num_hidden_layers = blocks
    return lm


STAMPS: list[float] = []


def _stamped(step):
    def wrapper(self, *a, **k):
        out = step(self, *a, **k)
        STAMPS.append(time.perf_counter())
        return out
    return wrapper


torch.optim.Optimizer.zero_grad = _stamped(torch.optim.Optimizer.zero_grad)


def step_times(model_name: str, blocks: int, cfg, calib) -> list[float]:
    lm = cut(anybit.load_model(model_name), blocks)
    STAMPS.clear()
    anybit.quantize(lm.model, cfg, calib, progress=False)
    return [b - a for a, b in zip(STAMPS, STAMPS[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", required=True, help="method:SCHEME[:key=value...], comma-separated")
    args = ap.parse_args()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({"meta": {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "commit": commit,
                               "command": " ".join(sys.argv)}}), flush=True)
    lm = anybit.load_model(args.model)
    calib = calibration_windows(lm.tokenizer, load_text(args.calib, "train"), args.nsamples, args.seqlen, 0)
    for row in args.rows.split(","):
        cfg = parse_row(row)
        dts = step_times(args.model, args.blocks, replace(cfg, options={**cfg.options, "epochs": args.epochs}), calib)
        print(json.dumps({"row": row, "model": args.model, "window": args.seqlen, "nsamples": args.nsamples,
                          "blocks": args.blocks, "epochs": args.epochs, "intervals": len(dts),
                          "ms_per_step_median": round(1000 * statistics.median(dts), 1),
                          "ms_per_step_mean": round(1000 * statistics.mean(dts), 1)}), flush=True)


if __name__ == "__main__":
    main()
