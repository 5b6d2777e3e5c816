"""Peak memory of quantization, streamed (one decoder block in memory at a time) and in
memory, on Hugging Face model folders; with the memory formula of docs/streaming.md checked
against every measured point and evaluated for LLaMA-7B/13B/70B shapes.

    python benchmarks/synthetic_llama.py /tmp/syn4096x4 --layers 4
    python benchmarks/synthetic_llama.py /tmp/syn4096 --layers 8
    python benchmarks/streaming_memory.py --model /tmp/syn4096x4 --model /tmp/syn4096 \
        --method rtn --method gptq --in-memory /tmp/syn4096 --in-memory-method rtn --out benchmarks/results/streaming_<date>.json

Each run is one `anybit quantize ... --out TMP` child process; its peak RSS is the child's
``ru_maxrss`` (os.wait4). Calibrated methods get random token windows (``--nsamples`` x
``--seqlen``, seed 0) from the model's own vocabulary, written to a text file: memory does
not depend on the text. Where a model runs both ways, the saved tensors are compared
(every tensor equal, shards or not) and each output's tensors hashed into one sha256
(``compare_outputs``). Any float Hugging Face folder works, e.g. SmolLM2's converted one
(docs/streaming.md). One heavy job at a time: nothing else may run while
the wall times are taken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
ANYBIT = [sys.executable, "-m", "anybit.cli"]

# LLaMA shapes for the prediction (Touvron et al. 2023; 70B with 8 key/value heads)
LLAMA = {
    "LLaMA-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "LLaMA-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


def block_linears(cfg: dict) -> list[tuple[int, int]]:
    """(out, in) of each linear of one Llama decoder block."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def predict(cfg: dict, method: str, nsamples: int, seqlen: int, base: float, stream: bool,
            act_budget: float = 4 * GiB) -> dict:
    """Peak RSS in bytes, as the sum of what the code holds at its largest moment (fp32 throughout):

    * ``base``: the interpreter with torch, transformers and anybit imported (measured).
    * embedding ``E`` = 4·V·h, in memory throughout; the head ``Hd`` = 4·V·h when untied.
      Streamed, the head is read only after the last block (``LazyWeights.load_head``) and
      quantized (RTN INT8) in blocks of rows: Hd + its int8 codes Hd/4 + ~64 MB of
      temporaries at that moment.
    * one float block ``B`` = 4·(sum of its linears), read when the method reaches it
      (in memory: every block, L·B).
    * the largest layer's work. RTN: its dequantized copy (for the reported error) and its
      codes, 5·n·k (the rest in ~16 MB row blocks). GPTQ: the Hessians of the block's
      linears, collected in one pass (4·k² for each distinct input: q/k/v share one, gate/up
      one), the inverse factor and the weight being solved with its error (4·k² + 3·4·n·k),
      and the calibration activations, inputs and outputs of the block, 2·4·N·T·h
      (memory-mapped files beyond the activation budget).
    * the packed model: ~4.5/32 of the float linears (streamed: the current block's, which
      leaves with its shard).
    """
    h, f, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    lin = block_linears(cfg)
    B = 4 * sum(n * k for n, k in lin)
    E = 4 * V * h
    Hd = 0 if cfg.get("tie_word_embeddings") else 4 * V * h
    packed = L * B * 4.5 / 32  # INT4 g128 codes, scales and zeros
    work = 0
    if method == "gptq":
        n, k = max(lin, key=lambda nk: nk[1] * max(nk[1], nk[0]))
        hessians = 4 * (h * h + h * h + h * h + f * f)  # q/k/v, o, gate/up, down
        acts = 2 * 4 * nsamples * seqlen * h
        work = hessians + 4 * k * k + 3 * 4 * n * k + (acts if acts <= act_budget else 0)
    elif method == "rtn":
        n, k = max(lin, key=lambda nk: nk[0] * nk[1])
        work = 5 * n * k
    if stream:
        during_blocks = base + E + B + B * 4.5 / 32 + work
        at_head = base + E + Hd * 1.25 + 64 * 2**20
    else:
        during_blocks = base + E + Hd + L * B + work + packed
        at_head = base + E + 3 * Hd + packed + L * B
    return {"bytes": max(during_blocks, at_head), "E": E, "Hd": Hd, "B": B, "work": work}


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(cmd: list[str]) -> tuple[int, float, float, int, str]:
    """(return code, wall s, peak RSS bytes, cpu s, stderr tail) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime, err[-600:]


def baseline_rss() -> float:
    code = "import torch, transformers, anybit.cli, anybit.io.checkpoint, anybit.models.lazy"
    rc, _, rss, _, err = measure([sys.executable, "-c", code])
    if rc != 0:
        raise SystemExit(f"cannot import anybit: {err}")
    return rss


def calib_file(folder: Path, vocab: int, nsamples: int, seqlen: int, where: Path) -> Path:
    rnd = random.Random(0)
    f = where / "calib.txt"
    words = [f"t{rnd.randrange(3, vocab)}" for _ in range(nsamples * seqlen * 2)]
    f.write_text("\n".join(" ".join(words[i: i + 64]) for i in range(0, len(words), 64)) + "\n")
    return f


def compare_outputs(a: Path, b: Path) -> tuple[bool, str, str]:
    """Whether two saved folders hold the same tensors (every tensor equal, shards or not), and
    one sha256 over each folder's tensors (name, dtype, shape, bytes, in name order: equal for a
    single-file and a sharded save of the same tensors, unlike the files' own hashes); each
    folder is read once."""
    import hashlib

    import torch

    from anybit.io.checkpoint import _read_weights

    sa, sb = _read_weights(a), _read_weights(b)
    same = sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    digests = []
    for state in (sa, sb):
        h = hashlib.sha256()
        for name, t in sorted(state.items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests.append(h.hexdigest())
    return same, digests[0], digests[1]


def repredict(path: Path) -> None:
    doc = json.loads(path.read_text())
    base = doc["baseline_rss_gib"] * GiB
    for row in doc["rows"]:
        cfg = json.loads((Path(row["model"]) / "config.json").read_text())
        row["predicted_gib"] = round(predict(cfg, row["method"], doc["nsamples"], doc["seqlen"], base,
                                             row["stream"])["bytes"] / GiB, 3)
    methods = sorted({row["method"] for row in doc["rows"]})
    doc["predicted_streamed_gib"] = {
        name: {m: round(predict(cfg, m, doc["nsamples"], doc["seqlen"], base, True)["bytes"] / GiB, 2) for m in methods}
        for name, cfg in LLAMA.items()}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    for row in doc["rows"]:
        print(row["layers"], row["method"], row["stream"], row["peak_rss_gib"], row["predicted_gib"])
    print(json.dumps(doc["predicted_streamed_gib"]))


def write(args, base: float, rows: list[dict], predictions: dict | None) -> None:
    if not args.out:
        return
    import torch

    doc = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "baseline_rss_gib": round(base / GiB, 3),
           "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows, "predicted_streamed_gib": predictions}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    if predictions is not None:
        print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="a Hugging Face folder (repeatable)")
    ap.add_argument("--method", action="append", default=None, help="rtn, gptq (repeatable; default both)")
    ap.add_argument("--in-memory", action="append", default=[], help="also run these models without --stream")
    ap.add_argument("--in-memory-method", action="append", default=None,
                    help="only these methods without --stream (default: every --method)")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--repredict", default=None, metavar="JSON",
                    help="recompute the predictions of a results file with this formula (no runs)")
    args = ap.parse_args()
    methods = args.method or ["rtn", "gptq"]
    if args.repredict:
        repredict(Path(args.repredict))
        return
    if not args.model:
        ap.error("give --model FOLDER (or --repredict JSON)")
    base = baseline_rss()
    tmp = Path(tempfile.mkdtemp(prefix="anybit-streaming-"))
    rows = []
    try:
        for m in args.model:
            folder = Path(m)
            cfg = json.loads((folder / "config.json").read_text())
            calib = calib_file(folder, cfg["vocab_size"], args.nsamples, args.seqlen, tmp)
            for method in methods:
                outs = {}
                both = m in args.in_memory and (args.in_memory_method is None or method in args.in_memory_method)
                for stream in ([True, False] if both else [True]):
                    out = tmp / f"q-{method}-{'s' if stream else 'm'}"
                    cmd = [*ANYBIT, "quantize", str(folder), "--method", method, "--wbits", str(args.wbits),
                           "--group-size", str(args.group_size), "--lm-head-bits", "8", "--out", str(out),
                           "--overwrite", "--no-resume", "--quiet"]
                    if method != "rtn":
                        cmd += ["--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
                    if stream:
                        cmd.append("--stream")
                    rc, wall, rss, cpu, err = measure(cmd)
                    if rc != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed ({rc}): {err}")
                    pred = predict(cfg, method, args.nsamples, args.seqlen, base, stream)
                    row = {"model": str(folder), "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
                           "method": method, "stream": stream, "bf16_gib": round(model_bytes(folder) / GiB, 3),
                           "peak_rss_gib": round(rss / GiB, 3), "predicted_gib": round(pred["bytes"] / GiB, 3),
                           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                           "out_gib": round(model_bytes(out) / GiB, 3), "command": " ".join(cmd[2:])}
                    outs[stream] = out
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(args, base, rows, None)  # each row as it comes: a long run stopped keeps its rows
                if len(outs) == 2:
                    same, rows[-2]["tensors_sha256"], rows[-1]["tensors_sha256"] = compare_outputs(outs[True],
                                                                                                   outs[False])
                    rows[-1]["same_tensors_as_stream"] = rows[-2]["same_tensors_as_stream"] = same
                    print(f"same tensors streamed and in memory: {rows[-1]['same_tensors_as_stream']} "
                          f"(sha256 {rows[-2]['tensors_sha256'][:16]}... / {rows[-1]['tensors_sha256'][:16]}...)",
                          flush=True)
                    write(args, base, rows, None)
                for o in outs.values():
                    shutil.rmtree(o, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    predictions = {name: {method: round(predict(cfg, method, args.nsamples, args.seqlen, base, True)["bytes"] / GiB, 2)
                          for method in methods} for name, cfg in LLAMA.items()}
    print("predicted peak RSS, streamed (GiB):", json.dumps(predictions))
    write(args, base, rows, predictions)


if __name__ == "__main__":
    main()
