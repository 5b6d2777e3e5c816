"""An anybit GGUF export checked in llama.cpp itself (the [bench] extra), for docs/export.md.

For an anybit folder whose linears sit on a ggml grid (INT4/5/8 at group 32):
  1. ``anybit export DIR --format gguf`` (the library call);
  2. llama.cpp's logits on the exported file vs anybit's own on the same token windows
     (mean KL per token, top-1 agreement, both perplexities);
  3. llama.cpp's perplexity of the export vs llama.cpp's own quantization (``--peer-type``,
     e.g. Q4_0) of the same float model, same windows (the source GGUF requantized by
     llama.cpp from its F32 form, as `bench e2e --against llama.cpp` does).

    python benchmarks/gguf_check.py /tmp/sm-gptq-w4g32 --windows 8 --seqlen 512 \\
        --peer-type Q4_0 --out benchmarks/results/gguf_check_smollm2.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--peer-type", default="Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from anybit.io.gguf_export import export_gguf, tensor_summary
    from anybit.models.loader import cache_dir, resolve_builtin
    from anybit.peers import check_setup, llama_cpp, write_result

    why = llama_cpp.unavailable()
    if why:
        raise SystemExit(why)
    model, windows, res = check_setup(args.model_dir, args.dataset, args.seqlen, args.windows, args.threads)
    info = getattr(model, "anybit_info", {})
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "export.gguf"
        t0 = time.perf_counter()
        exp = export_gguf(args.model_dir, gguf)
        res["export"] = {**{k: v for k, v in exp.items() if k != "out"}, "seconds": time.perf_counter() - t0,
                         "mib": gguf.stat().st_size / 2**20}
        res["agreement"] = llama_cpp.agreement(model, gguf, windows, args.threads)
        source = info.get("source")
        if source:
            src = Path(resolve_builtin(source)) if not Path(source).exists() else Path(source)
            if src.suffix == ".gguf":
                f32 = llama_cpp.quantize_gguf(src, cache_dir() / "llama_cpp" / f"{src.stem}.F32.gguf", "F32", args.threads)
                peer = llama_cpp.quantize_gguf(f32, cache_dir() / "llama_cpp" / f"{src.stem}.{args.peer_type}.gguf",
                                               args.peer_type, args.threads)
                res["llama_cpp_own"] = {"type": args.peer_type, "types": tensor_summary(peer),
                                        "mib": peer.stat().st_size / 2**20,
                                        "ppl": llama_cpp.gguf_perplexity(peer, windows, args.threads),
                                        "f32_ppl": llama_cpp.gguf_perplexity(f32, windows, args.threads)}
    write_result(res, args.out)


if __name__ == "__main__":
    main()
