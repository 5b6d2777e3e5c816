"""Time of PoTPTQ's step 1 (``pot.init_scales``, the data-free scale search) searching blocks of
rows (the default) against one search over the whole weight (``pot._SEARCH_ELEMENTS`` raised), in
one process, with the scales checked equal: on every linear of SmolLM2-135M (real weights) and
on one 2048x4096 slice; then one LLaMA-7B-shaped layer (random weights) with the blocks only.
Nothing else may run meanwhile.

    python benchmarks/pot_init_time.py --fmt potz --bits 3 --group-size 128
"""
from __future__ import annotations

import argparse
import time

import torch

import anybit
from anybit.formats import FormatSpec, pot


def timed(weights, spec: FormatSpec, whole: bool) -> tuple[float, list[torch.Tensor]]:
    saved = pot._SEARCH_ELEMENTS
    pot._SEARCH_ELEMENTS = 1 << 62 if whole else saved
    try:
        t = time.perf_counter()
        out = [pot.init_scales(w, spec) for w in weights]
        return time.perf_counter() - t, out
    finally:
        pot._SEARCH_ELEMENTS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmt", default="potz", choices=["pot", "potz"])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    spec = FormatSpec(args.fmt, args.bits, args.group_size)
    torch.manual_seed(0)
    lm = anybit.load_model("smollm2-135m")
    smol = [m.weight.data for name, m in lm.model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("model.layers")]
    cases = [("SmolLM2-135M, every decoder linear", smol), ("2048x4096 random", [torch.randn(2048, 4096) * 0.02])]
    print(f"{args.fmt} W{args.bits} g{args.group_size}, {torch.get_num_threads()} threads")
    print("| weights | whole weight (s) | blocks of rows (s) | ratio | same scales |")
    print("|---|---|---|---|---|")
    for label, weights in cases:
        t_whole, s_whole = timed(weights, spec, True)
        t_blocks, s_blocks = timed(weights, spec, False)
        same = all(torch.equal(a, b) for a, b in zip(s_whole, s_blocks))
        print(f"| {label} | {t_whole:.2f} | {t_blocks:.2f} | {t_blocks / t_whole:.2f} | {'yes' if same else 'NO'} |",
              flush=True)
    layer = [torch.randn(n, k) * 0.02 for n, k in [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]]
    t_layer, _ = timed(layer, spec, False)
    print(f"\none LLaMA-7B-shaped layer (7 random weights), blocks of rows: {t_layer:.1f} s")


if __name__ == "__main__":
    main()
