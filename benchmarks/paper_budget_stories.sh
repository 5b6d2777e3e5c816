#!/bin/bash
# Issue #13 on stories260K (5 blocks, hidden 64): the same rows as paper_budget_grid.sh at the
# papers' epoch counts, on its in-domain text: calibration 32 x 256 tokens of the stories260K
# train sample (seed 0), evaluation on every 256-token window of the test sample, KL on 4.
# Group size 32 for weight-only rows (the model's K is 64 and 172). Resumable like the grid.
# GPTQ/GPTQT rows name their column order and dampening (the defaults until 2026-12-05).
set -e
export ANYBIT_DATA=${ANYBIT_DATA:-../shared/data}
A=.venv/bin/anybit
S=$ANYBIT_DATA/corpora/other
W="stories260k --calib $S/stories260k-generated.train.txt --nsamples 32 --seqlen 256 --eval $S/stories260k-generated.test.txt --eval-seqlen 256 --kl-windows 4 --out benchmarks/results/stories-budget"
$A compare $W --methods rtn,gptq:order=none:damp_percent=0.01,gptq:order=act:damp_percent=0.01,gptq:order=gar:damp_percent=0.01,potptq,potptq:zero_level=false --schemes W3A16G32,W2A16G32
$A compare $W --methods potptq:steps=none,potptq:steps=init,potptq:steps=refine,potptq:zero_level=false:steps=none,potptq:zero_level=false:steps=init,potptq:zero_level=false:steps=refine --schemes W2A16G32
$A compare $W --methods gptqt:order=none:damp_percent=0.01,gptqt:offset16=true:order=none:damp_percent=0.01 --schemes W3A16G32,W2A16G32
$A compare $W --methods gptq:order=none:damp_percent=0.01,gptq:order=gar:damp_percent=0.01 --schemes W3A16G8,W2A16G8
$A compare $W --methods rtn,smoothquant,abq,abq:kl=maps,abq:loss=mse,abq:qk=false --schemes W4A4G-1,W2A8G-1,'W2*A8G-1',W6A6G-1
$A compare $W --methods flexq,flexq:a8=down_proj --schemes W6A6
$A compare $W --methods flexq --schemes W6A16
$A report benchmarks/results/stories-budget --title "stories260K, papers' epoch counts, stories train 32 x 256"
# what bfloat16 autocast costs (the default) against float32 training
$A compare $W --methods potptq:amp=false --schemes W3A16G32,W2A16G32
$A compare $W --methods abq:amp=false --schemes W4A4G-1,'W2*A8G-1'
$A report benchmarks/results/stories-budget --title "stories260K, papers' epoch counts, stories train 32 x 256"
# Q/K/V kept in float (RTN and SmoothQuant do not quantize them; ABQ-LLM does by default)
$A compare $W --methods abq:qkv=false --schemes W4A4G-1,'W2*A8G-1',W6A6G-1
$A report benchmarks/results/stories-budget --title "stories260K, papers' epoch counts, stories train 32 x 256"
