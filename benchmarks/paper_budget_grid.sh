#!/bin/bash
# Issue #13: the trained methods at the papers' epoch counts on SmolLM2-135M (Q4_1-dequantized),
# with the baselines they are judged against, on ONE documented calibration set for every row:
# C4 train sample, 32 windows x 512 tokens, seed 0 (the papers: 128 x 2048; the loop at 512
# tokens is ~4x cheaper per step, and 32 windows keep every row within a few hours here).
# Evaluation: WikiText-2 test, 2048-token windows, the first 40; KL to the float model on 4.
# Each `compare` call is resumable (finished cells are skipped, a killed cell resumes at its
# next block), so the script can be re-run until it completes. Run from the repository root.
set -e
export ANYBIT_DATA=${ANYBIT_DATA:-../shared/data}
A=.venv/bin/anybit
W="smollm2-135m --calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 --max-windows 40 --kl-windows 4 --out benchmarks/results/smollm2-budget"
# PoTPTQ, zero level (potz, the default): W3 g128 (10 epochs), the 2-bit ablation at g64 and W2 g128 (40 epochs)
$A compare $W --methods potptq --schemes W3A16G128
$A compare $W --methods potptq:steps=none,potptq:steps=init,potptq:steps=refine,potptq --schemes W2A16G64
$A compare $W --methods potptq --schemes W2A16G128
# baselines of the weight-only claims
$A compare $W --methods rtn,gptq --schemes W3A16G128,W2A16G64,W2A16G128
# PoTPTQ with the paper's plain format (pot, no zero level)
$A compare $W --methods potptq:zero_level=false --schemes W3A16G128,W2A16G128
$A compare $W --methods potptq:zero_level=false:steps=none,potptq:zero_level=false:steps=init,potptq:zero_level=false:steps=refine,potptq:zero_level=false --schemes W2A16G64
$A report benchmarks/results/smollm2-budget --paper benchmarks/paper_weight_only.json \
  --title "SmolLM2-135M (Q4_1-dequantized), papers' epoch counts, C4 32 x 512"
