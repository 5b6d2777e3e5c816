"""Decode tokens/s of one quantized model three ways, in one process: the Hugging Face model
eager with a static KV cache, the same under ``torch.compile`` (inductor, ``fullgraph=True``:
every QuantLinear is one ``torch.ops.anybit.qlinear`` operator), and anybit's lean decoder
(one native call per token where every linear has an int8 kernel). Issue 14 item 4 asks for
the faster of the first two against the third.

    python benchmarks/compiled_decode.py QUANTIZED_DIR [--prompt 128] [--new 32] [--rounds 2]

One heavy job at a time: nothing else may run while it times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import StaticCache

    import anybit
    from anybit.bench import machine
    from anybit.nn.decoder import StaticDecoder

    torch.set_num_threads(args.threads)
    model, _ = anybit.load(args.model)
    P, N = args.prompt, args.new
    ids = (torch.arange(P)[None] * 7919) % (model.config.vocab_size - 1) + 1
    cache = StaticCache(config=model.config, max_cache_len=P + N + 1)

    def hf(step) -> float:
        with torch.inference_mode():
            cache.reset()
            out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(P))
            nxt = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for i in range(N):
                out = step(nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([P + i]))
                nxt = out.logits[:, -1:].argmax(-1)
            return N / (time.perf_counter() - t)

    lean = StaticDecoder(model, P + N + 1)

    def native() -> float:
        with torch.inference_mode():
            lean.reset()
            logits = lean(ids)
            t = time.perf_counter()
            for _ in range(N):
                logits = lean(logits[:, -1:].argmax(-1))
            return N / (time.perf_counter() - t)

    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    hf(compiled)  # compiles (inductor; cached on disk across runs)
    compile_s = time.perf_counter() - t0
    runs = {"eager (transformers, static cache)": lambda: hf(model.forward),
            "torch.compile (inductor, fullgraph)": lambda: hf(compiled),
            "lean (anybit)": native}
    rates = {k: [] for k in runs}
    for _ in range(args.rounds):  # alternating, medians
        for k, fn in runs.items():
            rates[k].append(fn())
    res = {"machine": machine(), "model": args.model, "prompt": P, "new": N, "first_compiled_call_s": compile_s,
           "decode_tokens_per_s": {k: sorted(v)[len(v) // 2] for k, v in rates.items()},
           "decoder": "lean-native" if lean.fast is not None else "lean"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
