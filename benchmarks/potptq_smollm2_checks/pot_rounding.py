"""PoT rounding rule, step 1 only, zero-level format (potz): log-domain rounding
``round(log2(|w|/s))`` (SPEC §2; the boundary between s·2^e and s·2^(e+1) is √2·s·2^e) vs
nearest-level rounding (boundary 1.5·s·2^e, i.e. ``floor(log2(|w|/s) + 2 − log2 3)``).
Each variant fake-quantizes every decoder-block linear (its own step-1 grid search) and
prints one JSON line.

    ANYBIT_DATA=../shared/data .venv/bin/python benchmarks/potptq_smollm2_checks/pot_rounding.py \
        --model smollm2-135m --bits 3 --group-size 128 --max-windows 4
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import anybit
from anybit.data import eval_windows, load_text
from anybit.eval import perplexity
from anybit.formats import FormatSpec, pot
from anybit.formats.base import expand_groups, grouped
from anybit.models import get_adapter

NEAREST_SHIFT = 2 - math.log2(3)  # floor(x + 0.415): boundary at 1.5·2^e


def levels(a: torch.Tensor, s: torch.Tensor, spec: FormatSpec, rounding: str) -> torch.Tensor:
    """Magnitude |ŵ| for |w| = a and scale s (broadcast), potz levels {0, s·2^e}."""
    x = torch.log2((a / s).clamp_min(1e-30))
    e = torch.round(x) if rounding == "log" else torch.floor(x + NEAREST_SHIFT)
    q = s * torch.exp2(e.clamp(0, pot.top_exponent(spec)))
    return torch.where(a < 0.5 * s, 0.0, q)


def fake_quantize(w: torch.Tensor, spec: FormatSpec, rounding: str) -> torch.Tensor:
    s0 = pot.base_scale(w, spec)
    wg, mask = grouped(w.abs(), spec.group_size)
    a = torch.where(mask, wg, 0)
    best = best_err = None
    for beta in pot.DEFAULT_GRID:
        s = pot._clamp_scale(s0 * beta).half().float()
        err = ((a - levels(a, s.unsqueeze(-1), spec, rounding)) ** 2).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    se = expand_groups(best, spec.group_size, w.shape[-1])
    return torch.sign(w) * levels(w.abs(), se, spec, rounding)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=4)
    args = ap.parse_args()
    lm = anybit.load_model(args.model)
    text = load_text("wikitext2", "test")
    windows = eval_windows(lm.tokenizer, text, 2048, args.max_windows)
    adapter = get_adapter(lm.model)
    linears = [lin for b in adapter.get_blocks(lm.model) for lin in adapter.get_linears(b).values()]
    originals = [lin.weight.data.clone() for lin in linears]
    spec = FormatSpec("potz", args.bits, args.group_size)
    for rounding in ("log", "nearest"):
        errs = []
        for lin, w in zip(linears, originals):
            wq = fake_quantize(w.float(), spec, rounding)
            errs.append(((wq - w) ** 2).sum().item() / (w ** 2).sum().item())
            lin.weight.data.copy_(wq)
        res = perplexity(lm.model, windows, dataset=text.name, progress=False)
        print(json.dumps({"model": args.model, "format": "potz", "bits": args.bits, "group_size": args.group_size,
                          "rounding": rounding, "mean_rel_sq_weight_err": round(sum(errs) / len(errs), 5),
                          "windows": res.windows, "ppl": round(res.ppl, 3)}), flush=True)


if __name__ == "__main__":
    main()
