#!/bin/bash
# The SmolLM2-135M grid behind docs/RESULTS.md, as run on 2026-11-25: `anybit compare`
# calls into two folders (weight-only; weights+activations; each resumable: a re-run
# skips finished cells), then the two reports with the paper column.
# Run from the repository root after the README's install command. The cells took
# 5-60 min each on the 2-core reference machine (quantize times in the reports).
# GPTQ/GPTQT rows name their column order and dampening (the defaults until 2026-12-05).
set -e
export ANYBIT_DATA=${ANYBIT_DATA:-../shared/data}
A=.venv/bin/anybit
W="smollm2-135m --calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 --max-windows 40 --kl-windows 4 --out benchmarks/results/smollm2"
$A compare $W --methods rtn,gptq:order=none:damp_percent=0.01 --schemes W4A16G128,W3A16G128,W2A16G64
$A compare $W --methods gptqt:scale_grid=0.9/0.95/1.0:order=none:damp_percent=0.01 --schemes W3A16G128,W2A16G64
$A compare $W --methods bcq:fit=greedy,bcq:fit=alternating --schemes W3A16G128,W2A16G64
# PoTPTQ with the plain pot format (no zero level; the only format when these ran)
$A compare $W --methods potptq:zero_level=false:epochs=2 --schemes W3A16G128
$A compare $W --methods potptq:zero_level=false:epochs=1,potptq:zero_level=false:steps=init --schemes W2A16G64
# PoTPTQ with the zero level (potz, the default)
$A compare $W --methods potptq:epochs=1 --schemes W3A16G128,W2A16G64,W2A16G128
$A compare $W --methods potptq:steps=none,potptq:steps=init,potptq:steps=refine:epochs=1 --schemes W2A16G64
$A compare $W --methods potptq:steps=init,potptq:steps=none,potptq:steps=refine:epochs=1 --schemes W3A16G128
WA="smollm2-135m --calib c4 --nsamples 16 --seqlen 512 --eval wikitext2 --eval-seqlen 2048 --max-windows 10 --kl-windows 2 --out benchmarks/results/smollm2-wa"
$A compare $WA --methods rtn,smoothquant,flexq,flexq:a8_layers=0 --schemes W6A6
$A compare $WA --methods flexq --schemes W6A8
$A compare $WA --methods rtn,abq:epochs=2 --schemes 'W2*A8,W2A8'
$A compare $WA --methods abq:epochs=2 --schemes W4A4
$A compare $WA --methods rtn,smoothquant --schemes W8A8,W4A8,W4A4
$A compare $WA --methods abq:epochs=2 --schemes W6A6,W4A8
$A compare $WA --methods abq:epochs=2:qkv=false --schemes W6A6
$A report benchmarks/results/smollm2 --paper benchmarks/paper_weight_only.json --title "SmolLM2-135M, weight-only"
$A report benchmarks/results/smollm2-wa --paper benchmarks/paper_weight_activation.json \
  --title "SmolLM2-135M, weights and activations"
