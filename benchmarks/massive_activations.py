"""Where the hidden states' energy sits, block by block: the float model on the grid's
calibration windows (C4 train, 32 x 512, seed 0, as `paper_budget_grid.sh`).

    ANYBIT_DATA=../shared/data .venv/bin/python benchmarks/massive_activations.py [--model smollm2-135m]

Per decoder block output: the largest |h| with its window position and channel, the share of
Σ h² held by the top channel and by window position 0. The block-training methods score a
block by the relative error ‖Y_fp − Y_q‖² / ‖Y_fp‖² and ABQ-LLM trains on MSE(Y_fp, Y_q):
where one (position, channel) holds nearly all of Σ h², both measure little else.
"""

from __future__ import annotations

import argparse

import torch

from anybit.data import calibration_windows, load_text
from anybit.models.adapters import get_adapter
from anybit.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = load_model(args.model)
    ids = calibration_windows(lm.tokenizer, load_text(args.calib, "train"), args.nsamples, args.seqlen, args.seed)
    blocks = get_adapter(lm.model).get_blocks(lm.model)
    n, d = len(blocks), lm.model.config.hidden_size
    energy, pos0, channel = torch.zeros(n), torch.zeros(n), torch.zeros(n, d)  # Σh², at position 0, per channel
    peak = [(0.0, 0, 0)] * n  # largest |h|, its position and channel
    outs: list[torch.Tensor] = []
    # hooks, not output_hidden_states: its last entry is after the final norm
    for block in blocks:
        block.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.inference_mode():
        for s in range(0, ids.shape[0], 4):  # 4 windows at a time keeps the hidden states small
            outs.clear()
            lm.model(ids[s: s + 4])
            for i, h in enumerate(outs):
                sq = h.float().pow(2)
                energy[i] += sq.sum()
                pos0[i] += sq[:, 0].sum()
                channel[i] += sq.sum((0, 1))
                a = h.abs()
                v, flat = a.flatten().max(0)  # the first largest, in (window, position, channel) order
                if v.item() > peak[i][0]:
                    _, t, c = torch.unravel_index(flat, a.shape)
                    peak[i] = (v.item(), int(t), int(c))
    print(f"{args.model}, {args.calib} {args.nsamples} x {args.seqlen}, seed {args.seed}\n")
    print("| block | max abs h | at position, channel | share of Σh² in the top channel | share at position 0 |")
    print("|---|---|---|---|---|")
    for i in range(n):
        c = int(channel[i].argmax())
        print(f"| {i} | {peak[i][0]:.4g} | {peak[i][1]}, {peak[i][2]} | {channel[i, c] / energy[i]:.3f} (ch {c}) "
              f"| {pos0[i] / energy[i]:.3f} |")


if __name__ == "__main__":
    main()
