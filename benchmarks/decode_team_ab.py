"""A/B of the native decoding step's threading, in one process: the whole stack on one thread
team per token (the default) against one team per linear (``anybit_set_decode_team(0)``).

For each saved anybit model folder: the lean decoder prefills a short prompt, then decodes
``--tokens`` greedy tokens, alternating the two modes round by round (``--rounds``); tok/s
per round, the median ratio, and a check that both modes produce the same logits.

    python benchmarks/decode_team_ab.py /tmp/anybit-e2e/int3g128 /tmp/anybit-e2e/w6a6 --rounds 6

Nothing else may run meanwhile (two cores).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import anybit
from anybit.kernels import native
from anybit.nn.decoder import StaticDecoder


def run(dec: StaticDecoder, ids: torch.Tensor, tokens: int, team: int) -> tuple[float, torch.Tensor]:
    """tok/s of ``tokens`` greedy steps after prefilling ``ids``, and their logits."""
    dec.fast[0].anybit_set_decode_team(team)
    dec.reset()
    logits = dec(ids)
    out = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = dec(logits[:, -1:].argmax(-1))
        out.append(logits)
    dt = time.perf_counter() - t0
    return tokens / dt, torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="anybit model folders")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--prompt-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    print(f"| model | tok/s, team per linear | tok/s, one team per token | median ratio | same logits |")
    print("|---|---|---|---|---|")
    for path in args.models:
        model, _ = anybit.load(path)
        ids = (torch.arange(args.prompt_tokens)[None] * 7919) % (model.config.vocab_size - 1) + 1
        dec = StaticDecoder(model, args.prompt_tokens + args.tokens + 1)
        if dec.fast is None:
            print(f"| {path} | (no native step for this model) | | | |")
            continue
        speed: dict[int, list[float]] = {0: [], 1: []}
        outs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for r in range(args.rounds):
                for team in ((0, 1) if r % 2 == 0 else (1, 0)):
                    s, out = run(dec, ids, args.tokens, team)
                    speed[team].append(s)
                    outs.setdefault(team, out)
        dec.fast[0].anybit_set_decode_team(1)
        same = torch.equal(outs[0], outs[1])
        ratio = statistics.median(speed[1]) / statistics.median(speed[0])
        fmt = lambda v: " ".join(f"{x:.1f}" for x in v)  # noqa: E731
        print(f"| {path} | {fmt(speed[0])} | {fmt(speed[1])} | ×{ratio:.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
