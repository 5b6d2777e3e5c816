"""Markdown table from the JSON lines of ``methods_compare.py`` or ``pot_variants.py``.

    python benchmarks/rows_table.py benchmarks/results/potptq_stories.jsonl
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if "meta" not in r]
    if rows and "row" in rows[0]:
        print("| row (method:scheme:options) | bits/weight | quantize time (s) | peak RSS (MiB) | ppl |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "ppl" not in r:
                print(f"| `{r['row']}` | – | – | – | failed: {r.get('error', '?')} |")
                continue
            print(f"| `{r['row']}` | {r.get('bits_per_weight', 32)} | {r.get('quantize_s', '–')} | "
                  f"{r.get('peak_rss_mib', '–')} | {r['ppl']:.4g} |")
    else:
        print("| bits | base scale | zero level | mean rel. weight error | ppl |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['bits']} | {r['base_scale']} | {'yes' if r['zero_level'] else 'no'} | "
                  f"{r['mean_rel_weight_err']:.4f} | {r['ppl']:.4g} |")


if __name__ == "__main__":
    main(sys.argv[1])
