"""docs/RESULTS.md from the two SmolLM2 grid folders (their report.md, made by
``anybit report``) and the findings text in docs/results_findings.md; the plots are
copied next to it.

    python benchmarks/results_doc.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (("smollm2", "results_weight_only.png"), ("smollm2-wa", "results_weight_activation.png"),
           ("smollm2-budget", "results_budget.png"))

HEADER = """# Results: SmolLM2-135M, every method, next to the papers' numbers

Reproduce (after the README's install command; many hours on a 2-core CPU; each
`anybit compare` call resumes where it stopped):

```bash
bash benchmarks/smollm2_grid.sh && bash benchmarks/paper_budget_grid.sh && .venv/bin/python benchmarks/results_doc.py
```

Machine: x86-64 AMD EPYC, 2 cores (AVX-512), 24 GiB, no GPU; torch 2.13.0+cpu; run
2026-11-25. Cells ran two to four at a time on the two cores, so quantize times are
upper bounds. The paper column is LLaMA-7B (LLaMA-2-7B for FlexQ) from `SPEC.md`; ours is
a 135M-parameter model: compare orderings, not values. Two grids with two settings,
because the CPU time did not allow one: weight-only rows use C4 32 × 512 calibration
and the first 40 WikiText-2 windows of 2048 tokens; weight+activation rows use C4
16 × 512 and the first 10 windows (each grid has its own FP row). Trained methods ran
fewer epochs than the papers (the option is in the method name: `potptq:epochs=1`).
PoTPTQ rows without `zero_level=false` use the zero-level format `potz` (the default).
The third table (issue 13, `paper_budget_grid.sh`, 2026-12-01 onwards, still running) runs
the trained methods at the papers' epoch counts on one calibration set for every row (C4
32 × 512, seed 0; 40 WikiText-2 windows of 2048 tokens), one cell at a time; its
`quantize (s)` (wall) includes time the grid was paused for other measurements;
`quantize CPU (s)` is the process's CPU time (two threads), which pauses do not inflate.
"""


def main() -> None:
    parts = [HEADER]
    for folder, png in FOLDERS:
        report = (ROOT / "benchmarks" / "results" / folder / "report.md").read_text()
        lines = report.splitlines()
        title = lines[0].lstrip("# ")
        body = "\n".join(lines[1:]).replace("](pareto.png)", f"]({png})")
        parts.append(f"## {title}\n{body}")
        src = ROOT / "benchmarks" / "results" / folder / "pareto.png"
        if src.exists():
            shutil.copyfile(src, ROOT / "docs" / png)
    parts.append((ROOT / "docs" / "results_findings.md").read_text())
    (ROOT / "docs" / "RESULTS.md").write_text("\n\n".join(p.strip() for p in parts) + "\n")
    print(f"wrote {ROOT / 'docs' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
