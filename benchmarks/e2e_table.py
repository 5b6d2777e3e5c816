"""Markdown tables from ``anybit bench e2e DIR --json`` outputs (a JSON list, or JSON lines as
``benchmarks/e2e_smollm2.sh`` writes them), with the llama.cpp rows where the run had
``--against llama.cpp``. Beside each median ratio to llama.cpp, the range of the per-round
ratios (round i of both sides ran back to back).

    python benchmarks/e2e_table.py benchmarks/results/e2e/e2e_smollm2_2026-12-02.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(path: str) -> list[dict]:
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _bpw(q: dict) -> str:
    return f"{q['weights_mib']:.0f}"


def _spread(ours: dict, theirs: dict, key: str) -> str:
    """The range of the per-round ratios (round i of both sides ran back to back), which on a
    shared machine says more about what a median ratio can resolve than the median alone."""
    a, b = ours.get(f"{key}_rounds"), theirs.get(f"{key}_rounds")
    if not a or not b or len(a) != len(b):
        return ""
    r = [x / y for x, y in zip(a, b)]
    return f" ({min(r):.2f}–{max(r):.2f})"


def main(path: str) -> None:
    rows = _rows(path)
    m = rows[0]["machine"]
    first = rows[0]["model"]
    print(f"Machine: {m['cpu']}, {m['threads']} threads, ISA {m['isa']}, torch {m['torch']}, {m['date']}. "
          f"Prompt {first['prompt_tokens']} tokens, {first['new_tokens']} decoded tokens; each entry measured in its "
          f"own process, all entries of a row alternating for {rows[0].get('rounds', 1)} rounds, medians.\n")
    print("| anybit model | decoder | weights MiB | prefill tok/s | decode tok/s | peak RSS MiB | "
          "decode × fp32 | prefill × fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    b = rows[0]["baseline"]
    print(f"| fp32 `{b['model']}` (first row's run) | {b.get('decoder', '')} | {b['weights_mib']:.0f} | "
          f"{b['prefill_tokens_per_s']:.0f} | {b['decode_tokens_per_s']:.1f} | {b['peak_rss_mib']:.0f} | 1 | 1 |")
    for r in rows:
        q = r["model"]
        print(f"| `{Path(q['model']).name}` | {q.get('decoder', '')} | {_bpw(q)} | {q['prefill_tokens_per_s']:.0f} | "
              f"{q['decode_tokens_per_s']:.1f} | {q['peak_rss_mib']:.0f} | ×{r['decode_speedup']:.2f} | "
              f"×{r['prefill_speedup']:.2f} |")
    if not any("llama.cpp" in r for r in rows):
        return
    print("\n| anybit model | llama.cpp file (same run) | file MiB | llama.cpp prefill | llama.cpp decode | "
          "llama.cpp peak RSS | anybit decode ÷ llama.cpp (rounds' range) | anybit prefill ÷ llama.cpp (rounds' range) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for ll in r.get("llama.cpp", []):
            print(f"| `{Path(r['model']['model']).name}` | {ll['model'].split('.')[-2]} | {ll['weights_mib']:.0f} | "
                  f"{ll['prefill_tokens_per_s']:.0f} | {ll['decode_tokens_per_s']:.1f} | {ll['peak_rss_mib']:.0f} | "
                  f"×{ll['anybit_decode_ratio']:.2f}{_spread(r['model'], ll, 'decode')} | "
                  f"×{ll['anybit_prefill_ratio']:.2f}{_spread(r['model'], ll, 'prefill')} |")


if __name__ == "__main__":
    main(sys.argv[1])
