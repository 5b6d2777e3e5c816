"""The INT8 output head GEMV of an anybit model (49152x576 for SmolLM2) against llama.cpp's Q8_0
on the same shape, cold (two copies cycled each), at 2 and 1 threads, 3 rounds of 200 calls.

    python benchmarks/head_gemv.py /tmp/anybit-e2e/int3g128     (needs the [bench] extra)
"""
import sys
import time

import torch

import anybit
from anybit.kernels import native
from anybit.peers.llama_cpp import MulMat
model, _ = anybit.load(sys.argv[1])
h = torch.randn(1, model.lm_head.in_features)
for th in (2, 1):
    torch.set_num_threads(th)
    plans = [native.q8_plan([model.lm_head]), native.q8_plan([model.lm_head])]  # two copies cycled (56 MB > the L3)
    for p in plans: p.threads = th
    mm = MulMat("Q8_0", model.lm_head.out_features, model.lm_head.in_features, 1, 2, th)
    for r in range(3):
        t0 = time.perf_counter(); [plans[i % 2](h) for i in range(200)]; t1 = time.perf_counter()
        [mm() for _ in range(200)]; t2 = time.perf_counter()
        print(f"threads {th}: anybit INT8 g128 {(t1 - t0) / 0.2:.2f} ms, llama.cpp Q8_0 {(t2 - t1) / 0.2:.2f} ms")
    mm.close()
