"""A/B of the native decoding step in one process: the whole stack on one thread team per
token (the default) against one team per linear (``anybit_set_decode_team(0)``), or, with
``--other SO``, this build against another build of the native library (both on one team),
or, with ``--fuse`` (or ``--bcq-fuse``), BCQ and bit-plane decoding with Q/K/V and gate/up as one
call each (``native.BCQ_FUSE``, ``native.BITPLANE_FUSE``, B; prefill too) against one call per
linear (A), or, with ``--tile4``, the
rows-in-lanes int8 kernel (B) against the 4-row 512-bit tile (``native.set_q8_rows16``, A; each
side its own copy of the model, as the layouts differ).

For each saved anybit model folder: the lean decoder prefills a short prompt, then decodes
``--tokens`` greedy tokens, alternating the two sides round by round (``--rounds``); tok/s
per round, the median ratio (B / A), and whether both sides produce the same logits.

    python benchmarks/decode_team_ab.py /tmp/anybit-e2e/int3g128 /tmp/anybit-e2e/w6a6 --rounds 6
    python benchmarks/decode_team_ab.py /tmp/anybit-e2e/int3g128 --other /tmp/base_native.so
    python benchmarks/decode_team_ab.py /tmp/anybit-e2e/bcq3g128 /tmp/anybit-e2e/w6a6 --fuse
    python benchmarks/decode_team_ab.py /tmp/anybit-e2e/int4g128 --tile4

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
from ab_native import load_other  # benchmarks/ab_native.py


def run(dec: StaticDecoder, ids: torch.Tensor, tokens: int, team: int, rows16: bool = True) -> tuple[float, torch.Tensor]:
    """tok/s of ``tokens`` greedy steps after prefilling ``ids``, and their logits (the
    library of ``dec``'s native step also runs its head; ``rows16``: the int8 kernel in use)."""
    lib = dec.fast[0]
    native._lib = lib
    if hasattr(lib, "anybit_set_q8_rows16"):
        lib.anybit_set_q8_rows16(int(rows16))
    if hasattr(lib, "anybit_set_decode_team"):
        lib.anybit_set_decode_team(team)
    dec.reset()
    logits = dec(ids)
    out = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = dec(logits[:, -1:].argmax(-1))
        out.append(logits)
    dt = time.perf_counter() - t0
    return tokens / dt, torch.cat(out)


def decoder(model, max_len: int, lib, fuse: bool = True) -> StaticDecoder:
    """A lean decoder whose native step calls ``lib`` (``fuse``: BCQ and bit-plane Q/K/V and
    gate/up fused)."""
    own = native._lib, native.BCQ_FUSE, native.BITPLANE_FUSE
    native._lib, native.BCQ_FUSE, native.BITPLANE_FUSE = lib, fuse, fuse
    try:
        return StaticDecoder(model, max_len)
    finally:
        native._lib, native.BCQ_FUSE, native.BITPLANE_FUSE = own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="anybit model folders")
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--prompt-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--other", help="another build's _native*.so: compare it (A) with this build (B)")
    ap.add_argument("--fuse", "--bcq-fuse", dest="fuse", action="store_true",
                    help="BCQ and bit-plane Q/K/V and gate/up fused (B) against one call per linear (A)")
    ap.add_argument("--tile4", action="store_true",
                    help="the rows-in-lanes int8 kernel (B) against the 4-row 512-bit tile (A)")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("error: the native kernels are not built; run `python setup.py build_ext --inplace`")
    torch.set_num_threads(args.threads)
    own = native._load()
    fuse, rows16 = (True, True), (True, True)
    if args.tile4:
        if native.q8_kernel() != "rows16":
            raise SystemExit("error: the rows-in-lanes int8 kernel is not in use here (AVX-512 VNNI, ANYBIT_Q8_ROWS16)")
        sides, names, rows16 = ((own, 1), (own, 1)), ("4-row tile", "rows in lanes"), (False, True)
    elif args.other:
        own, other = load_other(args.other)
        sides, names = ((other, 1), (own, 1)), ("other build", "this build")
    elif args.fuse:
        sides, names, fuse = ((own, 1), (own, 1)), ("a call per linear", "fused"), (False, True)
    else:
        sides, names = ((own, 0), (own, 1)), ("team per linear", "one team per token")
    print(f"| model | tok/s, {names[0]} (A) | tok/s, {names[1]} (B) | median ratio B / A | same logits |")
    print("|---|---|---|---|---|")
    for path in args.models:
        model, _ = anybit.load(path)
        ids = (torch.arange(args.prompt_tokens)[None] * 7919) % (model.config.vocab_size - 1) + 1
        decs = []
        for i, ((lib, _), f, r16) in enumerate(zip(sides, fuse, rows16)):
            if args.tile4:  # a model per side: each caches the layout of its kernel (built with the decoder)
                native.set_q8_rows16(r16)
                model = anybit.load(path)[0] if i else model
            decs.append(decoder(model, args.prompt_tokens + args.tokens + 1, lib, f))
        native.set_q8_rows16(True)
        if any(d.fast is None for d in decs):
            print(f"| {path} | (no native step for this model) | | | |")
            continue
        speed: dict[int, list[float]] = {0: [], 1: []}
        outs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for r in range(args.rounds):
                for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                    s, out = run(decs[i], ids, args.tokens, sides[i][1], rows16[i])
                    speed[i].append(s)
                    outs.setdefault(i, out)
        native._lib = own
        own.anybit_set_decode_team(1)
        same = "yes" if torch.equal(outs[0], outs[1]) else "NO"
        if same == "NO" and torch.equal(outs[0].argmax(-1), outs[1].argmax(-1)):
            same = f"no: same tokens, max |Δlogit| {(outs[0] - outs[1]).abs().max().item():.2g}"
        ratio = statistics.median(speed[1]) / statistics.median(speed[0])
        fmt = lambda v: " ".join(f"{x:.1f}" for x in v)  # noqa: E731
        print(f"| {path} | {fmt(speed[0])} | {fmt(speed[1])} | ×{ratio:.3f} | {same} |")


if __name__ == "__main__":
    main()
