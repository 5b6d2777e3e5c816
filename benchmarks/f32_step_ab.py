"""A float model's decoding: the native one-call step with float32 GEMVs (kind 4, the default)
against the PyTorch step, same process, alternating rounds.

    python benchmarks/f32_step_ab.py [MODEL] [--tokens 64] [--rounds 5] [--threads 2]

MODEL: a name anybit loads (default smollm2-135m) or a folder. Prints decode tok/s of both and
their ratio (medians). Nothing else should run meanwhile (../shared/MACHINE-NOTES.md).
"""
from __future__ import annotations

import argparse
import time

import torch

from anybit.kernels import native
from anybit.models.loader import load_model
from anybit.nn.decoder import StaticDecoder


def decode_rate(model, native_step: bool, prompt: torch.Tensor, tokens: int) -> float:
    native.F32_STEP = native_step
    d = StaticDecoder(model, prompt.shape[1] + tokens + 1)
    assert (d.fast is not None) == native_step, "the native step did not apply"
    d(prompt)
    ids = prompt[:, -1:]
    t0 = time.perf_counter()
    for _ in range(tokens):
        ids = d(ids).argmax(-1).view(1, 1)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    prompt = torch.randint(1, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {"pytorch": [], "native": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            rates["pytorch"].append(decode_rate(model, False, prompt, args.tokens))
            rates["native"].append(decode_rate(model, True, prompt, args.tokens))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(f"{args.model}: decode tok/s PyTorch step {med['pytorch']:.1f} {[round(r, 1) for r in rates['pytorch']]}, "
          f"native step {med['native']:.1f} {[round(r, 1) for r in rates['native']]}, "
          f"native / PyTorch x{med['native'] / med['pytorch']:.2f}")


if __name__ == "__main__":
    main()
