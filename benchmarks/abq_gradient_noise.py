"""How much ABQ-LLM's short block training follows rounding-level differences in its
gradients: stories260K W4A4 (per channel, 4 epochs, 8 x 128 calibration windows, as
tests/methods/test_abq.py) trained three times: with the PyTorch backward of the
fake quantizers, with the native one (kernels_train.inc; equal to float32 rounding), and
with the PyTorch backward plus Gaussian noise of ``--noise`` relative on the per-token
quantizer's gradient. Prints each block's own error before -> after and chain error after.

    ANYBIT_DATA=../shared/data .venv/bin/python benchmarks/abq_gradient_noise.py
"""

from __future__ import annotations

import argparse
import sys

import torch

import anybit
from anybit.data import calibration_windows, load_text
from anybit.formats import activation
from anybit.kernels import native
from anybit.settings import data_dir


def run(label: str, epochs: int) -> None:
    lm = anybit.load_model("stories260k")
    train = data_dir() / "corpora" / "other" / "stories260k-generated.train.txt"
    calib = calibration_windows(lm.tokenizer, load_text(str(train), "train"), 8, 128)
    cfg = anybit.QuantConfig("abq", wbits=4, abits=4, group_size=-1, options={"epochs": epochs})
    anybit.quantize(lm.model, cfg, calib, progress=False)
    rows = [f"{b['own_error_before']:.5f}->{b['own_error_after']:.5f} chain {b['error_after']:.5f}"
            for b in lm.model.anybit_info["blocks"]]
    print(f"{label:>16}: " + " | ".join(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--noise", type=float, default=1e-7)
    args = ap.parse_args()
    if not native.has_train_kernels():
        sys.exit("the native kernels are not built: pip install -e . (see README)")
    has = native.has_train_kernels
    native.has_train_kernels = lambda: False
    run("pytorch", args.epochs)
    native.has_train_kernels = has
    run("native", args.epochs)
    native.has_train_kernels = lambda: False
    backward = activation._PerTokenFakeQuant.backward
    gen = torch.Generator().manual_seed(0)

    def noisy(ctx, gy):
        gx, none = backward(ctx, gy)
        return gx * (1 + args.noise * torch.randn(gx.shape, generator=gen)).to(gx.dtype), none

    activation._PerTokenFakeQuant.backward = staticmethod(noisy)
    run(f"pytorch+{args.noise:g}", args.epochs)


if __name__ == "__main__":
    main()
