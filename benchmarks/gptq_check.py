"""An anybit GPTQ-layout export loaded by the tools its users run, for docs/export.md:
GPTQModel with each of its CPU kernels and activation dtypes, and transformers'
``from_pretrained`` (its GPTQ path: optimum -> gptqmodel). Run with the Python of the
environment that has GPTQModel (README, "Peer checks").

For each (kernel, dtype): whether it loads (or the peer's own one-line refusal), the
weights its kernel applies against anybit's dequantized weights (max |difference| over
the layer's max |w|; layers equal after rounding anybit's to that dtype), and perplexity
against anybit's own on the same windows.

    /tmp/gqm/bin/python benchmarks/gptq_check.py DIR --windows 8 --seqlen 512 \\
        --out benchmarks/results/gptq_check_smollm2_w4g32.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _weights_vs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], dtype: torch.dtype,
                columns: int | None) -> dict:
    from anybit.peers.gptqmodel import sample_columns

    rel, equal = 0.0, 0
    for name, w in theirs.items():
        ref = ours[name] if columns is None else ours[name][:, sample_columns(ours[name].shape[1], columns)]
        rel = max(rel, float((w - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
        equal += bool(torch.equal(w, ref.to(dtype).float()))
    return {"layers": len(theirs), "columns": columns or "all", "max_rel_diff": rel,
            "equal_after_rounding": equal, "dtype_eps": torch.finfo(dtype).eps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--backends", default="auto,gptq_torch,gptq_torch_fused,gptq_torch_aten,gptq_torch_cpu_avx512")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--fp16-windows", type=int, default=1,
                    help="windows for float16 rows (CPU float16 matmuls run ~50-100x slower than bfloat16 here)")
    ap.add_argument("--checkpoint-format", default="auto")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from anybit.eval import perplexity
    from anybit.io.gptq_layout import export_gptq
    from anybit.nn import QuantLinear
    from anybit.peers import check_setup, dequantized_float, first_line, write_result
    from anybit.peers import gptqmodel as peer

    why = peer.unavailable()
    if why:
        raise SystemExit(why)
    import gptqmodel
    import transformers

    model, windows, res = check_setup(args.model_dir, args.dataset, args.seqlen, args.windows, args.threads)
    ours = {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    own = perplexity(model, windows, args.dataset, progress=False)
    own16 = perplexity(model, windows[:args.fp16_windows], args.dataset, progress=False)
    # the same dequantized weights as a float model in each dtype: what dtype rounding alone costs
    flt = dequantized_float(model)
    same_dtype = {}
    for d in args.dtypes.split(","):
        w = windows[:args.fp16_windows] if d == "float16" else windows
        same_dtype[d] = perplexity(copy.deepcopy(flt).to(getattr(torch, d)), w, args.dataset, progress=False).ppl
    res.update({"command": " ".join([Path(sys.executable).name] + sys.argv),
                "gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__, "anybit_ppl": own.ppl,
                "fp16_windows": args.fp16_windows, "anybit_ppl_fp16_windows": own16.ppl,
                "dequantized_float_ppl": same_dtype, "peers": []})
    del model, flt
    with tempfile.TemporaryDirectory() as tmp:
        exp = export_gptq(args.model_dir, Path(tmp) / "gptq", checkpoint_format=args.checkpoint_format)
        out, res["checkpoint_format"] = exp["out"], exp["checkpoint_format"]
        runs = [("gptqmodel", b, d) for b in args.backends.split(",") for d in args.dtypes.split(",")]
        if not args.no_transformers:
            runs += [("transformers", "from_pretrained", d) for d in args.dtypes.split(",")]
        for loader, backend, dtype in runs:
            row = {"loader": loader, "backend": backend, "dtype": dtype}
            t0 = time.perf_counter()
            try:
                m = peer.load(out, backend, dtype) if loader == "gptqmodel" else peer.load_transformers(out, dtype)
            except Exception as e:  # the peer's own refusal, kept as its first line
                row["refused"] = first_line(e)
                print(json.dumps(row), flush=True)
                res["peers"].append(row)
                continue
            row["load_s"] = time.perf_counter() - t0
            row["kernels"] = peer.kernel_names(m)
            try:
                cols = 64 if dtype == "float16" else None  # CPU float16 kernels: a sample of columns
                row["weights"] = _weights_vs(ours, peer.effective_weights(m, cols), m.dtype, cols)
                fp16 = dtype == "float16"
                r = perplexity(m, windows[:args.fp16_windows] if fp16 else windows, args.dataset, progress=False)
            except Exception as e:  # loaded, but its kernel refuses to run these shapes
                row["failed"] = first_line(e)
            else:
                row.update(windows=r.windows, ppl=r.ppl, ppl_vs_anybit=r.ppl / (own16 if fp16 else own).ppl - 1,
                           ppl_vs_same_dtype_float=r.ppl / same_dtype[dtype] - 1, eval_s=r.seconds)
            print(json.dumps(row), flush=True)
            res["peers"].append(row)
            del m
    write_result(res, args.out)


if __name__ == "__main__":
    main()
