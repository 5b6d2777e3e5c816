"""PoT format choices (SPEC §2/§3 *open* points), measured data-free (PoTPTQ step 1 only):

* the base scale ``s0``: ``pow`` = max|w| / 2^(E−1) or ``range`` = max|w| / (2^E − 1);
* a zero level: the plain format has none (codes = sign + exponent, levels ±s·2^e); the
  variant ``zero`` reserves exponent code 0 for 0, so levels are {0, ±s, …, ±s·2^(E−2)}
  (one magnitude fewer). Weights below s/2 round to 0.

Each row fake-quantizes every decoder-block linear with the step-1 grid search of that
variant and prints one JSON object (mean relative weight error, perplexity).

    python benchmarks/pot_variants.py --model stories260k \
        --eval ../shared/data/corpora/other/stories260k-generated.test.txt --seqlen 256 --group-size 32
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
from anybit.formats import FormatSpec, pot
from anybit.formats.base import expand_groups, grouped
from anybit.models import get_adapter


def fake_pot_zero(w: torch.Tensor, s: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """The zero-level variant: exponent code 0 = 0, codes 1..E = ±s·2^(code−1)."""
    k = w.shape[-1]
    se = expand_groups(s, spec.group_size, k)
    mag = w.abs() / se
    e = torch.round(torch.log2(mag.clamp_min(1e-30))).clamp(0, pot.max_exponent(spec.bits) - 1)
    q = se * torch.exp2(e) * torch.sign(w)
    return torch.where(mag < 0.5, torch.zeros_like(w), q)


def init_zero(w: torch.Tensor, spec: FormatSpec, rule: str) -> torch.Tensor:
    """Step-1 grid search for the zero-level variant (same grid and base scales, E−1 magnitudes)."""
    wg, mask = grouped(w.abs(), spec.group_size)
    amax = torch.where(mask, wg, 0).amax(-1)
    e_max = pot.max_exponent(spec.bits) - 1
    s0 = amax / (2.0 ** (e_max - 1) if rule == "pow" else float((1 << e_max) - 1)) if e_max > 0 else amax
    best = best_err = None
    for beta in pot.DEFAULT_GRID:
        s = (s0 * beta).clamp_min(1e-8).to(torch.float16).float()
        eg, mask = grouped(fake_pot_zero(w, s, spec) - w, spec.group_size)
        err = torch.where(mask, eg * eg, 0).sum(-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def fake_quantize(w: torch.Tensor, spec: FormatSpec, rule: str, zero: bool) -> torch.Tensor:
    if zero:
        return fake_pot_zero(w, init_zero(w, spec, rule), spec)
    s = pot.init_scales(w, spec, rule)
    return pot.decode(pot.encode(w, s, spec), s, spec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", default="2,3,4")
    args = ap.parse_args()
    print(json.dumps({"meta": {"machine": platform.machine(), "threads": torch.get_num_threads(),
                               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}}), flush=True)
    lm = anybit.load_model(args.model)
    text = load_text(args.eval, "test")
    windows = eval_windows(lm.tokenizer, text, args.seqlen, args.max_windows)
    adapter = get_adapter(lm.model)
    originals = {f"{i}.{n}": lin.weight.data.clone() for i, b in enumerate(adapter.get_blocks(lm.model))
                 for n, lin in adapter.get_linears(b).items()}
    for bits in (int(b) for b in args.bits.split(",")):
        spec = FormatSpec("pot", bits, args.group_size)
        for rule in ("pow", "range"):
            for zero in (False, True):
                errs = []
                for i, b in enumerate(adapter.get_blocks(lm.model)):
                    for n, lin in adapter.get_linears(b).items():
                        w = originals[f"{i}.{n}"]
                        wq = fake_quantize(w.float(), spec, rule, zero)
                        errs.append(((wq - w) ** 2).sum().item() / (w ** 2).sum().item())
                        lin.weight.data.copy_(wq)
                res = perplexity(lm.model, windows, dataset=text.name, progress=False)
                print(json.dumps({"model": args.model, "bits": bits, "group_size": args.group_size, "base_scale": rule,
                                  "zero_level": zero, "mean_rel_weight_err": round(sum(errs) / len(errs), 5),
                                  "eval": text.name, "seqlen": res.seqlen, "windows": res.windows,
                                  "ppl": round(res.ppl, 3)}), flush=True)
        for i, b in enumerate(adapter.get_blocks(lm.model)):
            for n, lin in adapter.get_linears(b).items():
                lin.weight.data.copy_(originals[f"{i}.{n}"])


if __name__ == "__main__":
    main()
