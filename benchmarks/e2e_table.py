"""Markdown table from a JSON list of ``anybit bench e2e DIR --json`` outputs.

    python benchmarks/e2e_table.py benchmarks/results/e2e/e2e_smollm2_2026-11-25.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = json.load(open(path))
    m = rows[0]["machine"]
    print(f"Machine: {m['cpu']}, {m['threads']} threads, ISA {m['isa']}, torch {m['torch']}, {m['date']}. "
          f"Each row is one `anybit bench e2e` run: the float model and the quantized one measured in the "
          f"same process (prompt {rows[0]['model']['prompt_tokens']} tokens, {rows[0]['model']['new_tokens']} "
          f"decoded tokens, medians).\n")
    print("| quantized folder | weights MiB (float) | prefill tok/s (float) | decode tok/s (float) | "
          "decode speed-up | prefill speed-up | peak RSS MiB (float) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, q = r["baseline"], r["model"]
        print(f"| `{q['model']}` | {q['weights_mib']:.0f} ({b['weights_mib']:.0f}) | "
              f"{q['prefill_tokens_per_s']:.0f} ({b['prefill_tokens_per_s']:.0f}) | "
              f"{q['decode_tokens_per_s']:.1f} ({b['decode_tokens_per_s']:.1f}) | "
              f"×{r['decode_speedup']:.2f} | ×{r['prefill_speedup']:.2f} | "
              f"{q['peak_rss_mib']:.0f} ({b['peak_rss_mib']:.0f}) |")


if __name__ == "__main__":
    main(sys.argv[1])
