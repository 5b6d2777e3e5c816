#!/bin/bash
# The SmolLM2-135M grid behind docs/RESULTS.md: two `anybit compare` runs (weight-only;
# weight+activation), each resumable, then their reports with the paper column.
# Run from the repository root after the README's install command. Takes many hours on
# the 2-core reference machine (see the timings in the reports).
set -e
export ANYBIT_DATA=${ANYBIT_DATA:-../shared/data}
A=.venv/bin/anybit
$A compare smollm2-135m --calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 \
  --max-windows 40 --kl-windows 4 --out benchmarks/results/smollm2 \
  --methods rtn,gptq,gptqt:scale_grid=0.9/0.95/1.0,potptq:epochs=2,potptq:steps=init,bcq:fit=greedy \
  --schemes W4A16G128,W3A16G128,W2A16G64
$A compare smollm2-135m --calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 \
  --max-windows 40 --kl-windows 4 --out benchmarks/results/smollm2 \
  --methods potptq:steps=none,potptq:steps=refine:epochs=2 --schemes W2A16G64
$A compare smollm2-135m --calib c4 --nsamples 16 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 \
  --max-windows 10 --kl-windows 2 --out benchmarks/results/smollm2-wa \
  --methods rtn,smoothquant,abq:epochs=2,flexq,flexq:a8_layers=0 \
  --schemes W8A8,W6A6,W6A8,W4A8,W4A4,W2A8,'W2*A8'
$A report benchmarks/results/smollm2 --paper benchmarks/paper_weight_only.json \
  --title "SmolLM2-135M, weight-only"
$A report benchmarks/results/smollm2-wa --paper benchmarks/paper_weight_activation.json \
  --title "SmolLM2-135M, weights and activations"
