"""Markdown tables from the JSON of ``anybit bench kernels --json`` (so that the docs quote
the measured file, not hand-copied numbers).

    python benchmarks/kernels_table.py benchmarks/results/kernels_2026-11-25.json
    python benchmarks/kernels_table.py AFTER.json --before BEFORE.json   # median ms before -> after

With ``--before``: one table per batch of the cases both files hold, "before → after (×before/after)".
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = json.load(open(path))
    m = rows[0]["machine"]
    read = rows[0].get("read_gb_per_s")
    mode = "" if "cold" not in rows[0] else ("; cold (distinct matrices cycled, weights read from memory)"
                                              if rows[0]["cold"] else "; hot (one matrix per case)")
    print(f"Machine: {m['cpu']}, {m['threads']} threads, ISA {m['isa']}, torch {m['torch']}, {m['date']}; "
          f"copy bandwidth {rows[0]['copy_gb_per_s']:.1f} GB/s (read + write)"
          + (f", streaming read {read:.1f} GB/s" if read else "") + f"{mode}.\n")
    shapes = []
    for r in rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for batch in sorted({r["batch"] for r in rows if r["op"] == "gemm"}):
        extra = ", % of the read bandwidth" if rows[0].get("read_gb_per_s") else ""
        print(f"\n### GEMV/GEMM, batch {batch}: ratio to F.linear fp32 (bf16), median time{extra}\n")
        print("| format | " + " | ".join(f"{s[0]}×{s[1]}" for s in shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        cases = []
        for r in rows:
            key = (r["format"], r["bits"], r["abits"])
            if r["op"] == "gemm" and r["batch"] == batch and key not in cases:
                cases.append(key)
        for fmt, bits, abits in cases:
            cells = []
            for s in shapes:
                r = next((r for r in rows if r["op"] == "gemm" and r["batch"] == batch and r["shape"] == s
                          and (r["format"], r["bits"], r["abits"]) == (fmt, bits, abits)), None)
                frac = None if r is None else r.get("fraction_of_read_bandwidth")
                bf16 = "" if r is None or r.get("ratio_vs_bf16") is None else f" (×{r['ratio_vs_bf16']:.2f})"
                cells.append("–" if r is None else
                             f"×{r['ratio_vs_fp32']:.2f}{bf16} {r['median_s'] * 1e3:.3f} ms"
                             + (f", {100 * frac:.0f} %" if frac is not None and batch == 1 else ""))
            name = (f"{fmt} ({bits} b/w)" if fmt.startswith("llama.cpp")
                    else f"{fmt} W{bits}" + (f"A{abits}" if abits < 16 else ""))
            print(f"| {name} | " + " | ".join(cells) + " |")
        fp = {tuple(s): next(r for r in rows if r["shape"] == s and r["batch"] == batch and r["op"] == "gemm")
              for s in shapes}
        print("| F.linear fp32 / bf16 | " + " | ".join(
            f"{fp[tuple(s)]['fp32_median_s'] * 1e3:.3f} / {fp[tuple(s)]['bf16_median_s'] * 1e3:.3f} ms" for s in shapes) + " |")
    deq = [r for r in rows if r["op"].startswith("dequantize")]
    if deq:
        print("\n### Dequantize-only, median time (INT: (q − z)·s; PoT: exponent add per weight, or per group into a table)\n")
        ops = []
        for r in deq:
            if (r["format"], r["op"]) not in ops:
                ops.append((r["format"], r["op"]))
        print("| kernel | bits | " + " | ".join(f"{s[0]}×{s[1]}" for s in shapes) + " |")
        print("|---|---|" + "---|" * len(shapes))
        for fmt, op in ops:
            for bits in sorted({r["bits"] for r in deq}):
                cells = []
                for s in shapes:
                    r = next((r for r in deq if r["shape"] == s and r["format"] == fmt and r["op"] == op
                              and r["bits"] == bits), None)
                    cells.append("–" if r is None else f"{r['median_s'] * 1e3:.3f} ms")
                print(f"| {fmt} {op} | {bits} | " + " | ".join(cells) + " |")
    targets(rows)


def targets(rows: list[dict]) -> None:
    """The kernels issue's targets at batch 1, 4096×4096, computed from the same file."""
    def gemm(fmt: str, bits: int, abits: int = 16) -> dict | None:
        return next((r for r in rows if r["op"] == "gemm" and r["batch"] == 1 and r["shape"] == [4096, 4096]
                     and (r["format"], r["bits"], r["abits"]) == (fmt, bits, abits)), None)

    print("\n### Targets (batch 1, 4096×4096, ratio to F.linear fp32 in the same run)\n")
    print("| case | target | measured | met |")
    print("|---|---|---|---|")
    for name, fmt, bits, abits, goal in (("INT4", "int", 4, 16, 4), ("PoT W3", "pot", 3, 16, 5),
                                         ("BCQ W3 LUT-GEMM", "bcq", 3, 16, 5),
                                         ("bit-plane W2A8", "bitplane", 2, 8, 2), ("bit-plane W6A6", "bitplane", 6, 6, 2)):
        r = gemm(fmt, bits, abits)
        if r is not None:
            print(f"| {name} | ≥ {goal}× | {r['ratio_vs_fp32']:.2f}× | {'yes' if r['ratio_vs_fp32'] >= goal else 'no'} |")
    for bits in (2, 3, 4):
        def deq(fmt: str, op: str) -> dict | None:
            return next((r for r in rows if r["op"] == op and r["format"] == fmt and r["bits"] == bits
                         and r["shape"] == [4096, 4096]), None)
        i, p = deq("int", "dequantize-in-cache"), deq("pot", "dequantize-table-in-cache")
        pa = deq("pot", "dequantize-add-in-cache")
        if i and p and pa:
            best = min(p["median_s"], pa["median_s"])
            print(f"| PoT W{bits} dequantize vs INT W{bits} (in cache; table / per-weight add) | ≥ 1.5× | "
                  f"{i['median_s'] / p['median_s']:.2f}× / {i['median_s'] / pa['median_s']:.2f}× | "
                  f"{'yes' if i['median_s'] / best >= 1.5 else 'no'} |")


def compare(before_path: str, after_path: str) -> None:
    """Median ms of each case of both files, before -> after, with the speed-up before / after."""
    before, after = json.load(open(before_path)), json.load(open(after_path))

    def key(r: dict) -> tuple:
        return (r["format"], r["bits"], r["abits"], r["batch"], tuple(r["shape"]))

    old = {key(r): r for r in before if r["op"] == "gemm"}
    rows = [r for r in after if r["op"] == "gemm" and key(r) in old]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    for name, run in (("before", before), ("after", after)):
        fp32 = next((f"{x['fp32_median_s'] * 1e3:.3f} ms" for x in run
                     if x["op"] == "gemm" and x["shape"] == [4096, 4096] and x["batch"] == 1), "–")
        print(f"{name}: {run[0]['machine']['date']}, streaming read {run[0].get('read_gb_per_s', 0):.1f} GB/s; "
              f"fp32 F.linear 4096×4096 batch 1: {fp32}")
    for batch in sorted({r["batch"] for r in rows}):
        print(f"\n| format, batch {batch} | " + " | ".join(f"{s[0]}×{s[1]}" for s in shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        for fmt, bits, abits in dict.fromkeys((r["format"], r["bits"], r["abits"]) for r in rows if r["batch"] == batch):
            cells = []
            for s in shapes:
                k = (fmt, bits, abits, batch, s)
                a = next((r for r in rows if key(r) == k), None)
                if a is None:
                    cells.append("–")
                    continue
                b = old[k]["median_s"]
                cells.append(f"{b * 1e3:.3f} → {a['median_s'] * 1e3:.3f} (×{b / a['median_s']:.2f})")
            print(f"| {fmt} W{bits}" + (f"A{abits}" if abits < 16 else "") + " | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[2] == "--before":
        compare(sys.argv[3], sys.argv[1])
    else:
        main(sys.argv[1])
