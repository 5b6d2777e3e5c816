"""The docs/export.md tables of the GPTQ-layout peer checks, from gptq_check.py's JSON files:
one table per model, a row per loader/kernel, a column per activation dtype. A cell is the
perplexity against anybit's own (and against anybit's dequantized weights run as a float
model in that dtype), or why the peer did not run it.

    python benchmarks/gptq_table.py benchmarks/results/gptq_check_*.json
"""

from __future__ import annotations

import json
import re
import sys


def _why(msg: str) -> str:
    if m := re.search(r"only supports `\[(.*?)\]` bits", msg):
        return f"refused: bits {m.group(1)} only"
    if m := re.search(r"only supports `\[(.*?)\]` dtype", msg):
        return "refused: " + m.group(1).replace("torch.", "") + " only"
    if "must be divisible by `group_size" in msg:
        return "refused: K % group != 0"
    if "divisible by qGroupSize" in msg:
        return "fails at run: K % group != 0"
    return msg[:60].replace("|", "/")


def main(paths: list[str]) -> None:
    for p in paths:
        r = json.load(open(p))
        dtypes = list(dict.fromkeys(row["dtype"] for row in r["peers"]))
        print(f"**{r['method']} {r['scheme']}** (`checkpoint_format: {r['checkpoint_format']}`), anybit ppl "
              f"{r['anybit_ppl']:.3f} ({r['windows']} x {r['seqlen']}; float16 cells: {r['fp16_windows']} window)\n")
        print("| loader / kernel | " + " | ".join(dtypes) + " |")
        print("|---|" + "---|" * len(dtypes))
        rows: dict[str, dict] = {}
        for row in r["peers"]:
            who = f"GPTQModel `{row['backend']}`" if row["loader"] == "gptqmodel" else "transformers `from_pretrained`"
            if "refused" in row or "failed" in row:
                cell = _why(row.get("refused") or row.get("failed"))
            else:
                w = row["weights"]
                cell = (f"{', '.join(k.replace('Linear', '') for k in row['kernels'])}: "
                        f"{100 * row['ppl_vs_anybit']:+.2f} % ({100 * row['ppl_vs_same_dtype_float']:+.2f} %), "
                        f"w {w['max_rel_diff']:.0e}")
            rows.setdefault(who, {})[row["dtype"]] = cell
        for who, cells in rows.items():
            print(f"| {who} | " + " | ".join(cells.get(d, "") for d in dtypes) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
