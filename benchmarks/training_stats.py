"""Where the trained parameters went: per-block statistics of the block-trained rows
(PoTPTQ step 2, ABQ-LLM) of a ``compare`` folder, from the ``blocks`` field that
``anybit compare`` stores in ``results.jsonl``.

    .venv/bin/python benchmarks/training_stats.py benchmarks/results/smollm2-budget [--plot FILE.png]

Prints one markdown table per row (block output error before/after training, steps, and
PoTPTQ's mean/max |Γ| or ABQ-LLM's own error (against the float block on the same quantized
inputs: what training can act on; rows from 2026-12-07 on), clip factors σ(γ), σ(β), LET
scale ratios to their initial values and Q/K scales), and with ``--plot`` a figure of the error ratio per block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def rng(d: dict | None) -> str:
    return "–" if not d else f"{fmt(d['min'])} / {fmt(d['mean'])} / {fmt(d['max'])}"


def table(row: dict) -> str:
    blocks = row["blocks"]
    pot = "gamma_abs_mean" in blocks[0]
    if pot:
        head = "| block | error before | error after | ratio | steps | mean abs Γ | max abs Γ | epoch kept |\n|---|---|---|---|---|---|---|---|"
    else:
        head = ("| block | error before | error after | ratio | own error before / after | steps | loss first / last epoch "
                "| σ(γ) min/mean/max | σ(β) min/mean/max | LET scale / init min/mean/max | Q/K scale min/mean/max | DC max abs a |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"**{row['method']} {row['scheme']}** (ppl {fmt(next(iter(row.get('ppl', {}).values()), None), 4)}, "
             f"quantize {fmt(row.get('quantize_s'), 4)} s, peak RSS {fmt(row.get('peak_rss_mib'))} MiB)", "", head]
    for b in blocks:
        ratio = b["error_after"] / b["error_before"] if b.get("error_before") else None
        common = f"| {b['block']} | {fmt(b['error_before'])} | {fmt(b['error_after'])} | {fmt(ratio)} |"
        if pot:
            lines.append(f"{common} {b['steps']} | {fmt(b['gamma_abs_mean'])} | {fmt(b['gamma_abs_max'])} | {b.get('kept_epoch', '–')} |")
        else:
            lines.append(f"{common} {fmt(b.get('own_error_before'))} / {fmt(b.get('own_error_after'))} | {b['steps']} | "
                         f"{fmt(b.get('loss_first_epoch'))} / {fmt(b.get('loss_last_epoch'))} | "
                         f"{rng(b.get('clip_gamma'))} | {rng(b.get('clip_beta'))} | {rng(b.get('let_ratio'))} | "
                         f"{rng(b.get('qk_scale'))} | {fmt(b.get('dc_a_abs_max'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in (Path(args.folder) / "results.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("status") == "ok" and r.get("blocks")]
    for r in rows:
        print(table(r))
        print()
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in rows:
            ys = [b["error_after"] / b["error_before"] for b in r["blocks"] if b.get("error_before")]
            ax.plot(range(len(ys)), ys, marker=".", label=f"{r['method']} {r['scheme']}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("decoder block")
        ax.set_ylabel("block output error after / before training")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
