#!/usr/bin/env bash
# The 4096-hidden Llama with random weights (benchmarks/synthetic_llama.py: LLaMA-7B's layer
# shapes, 8 layers, 1.9B parameters; no download) end to end: prefill / decode tok/s and peak RSS
# of the float model and of one quantized model per format, next to llama.cpp on the same
# weights (the F16 GGUF the script writes) re-quantized to the nearest types, all from
# `anybit bench e2e --against llama.cpp`. At this width the weights, not the per-token overhead,
# set a token's cost. Models as benchmarks/e2e_smollm2.sh (RTN; INT8 heads), written with
# --stream; BCQ W3 by the greedy binary-coding fit (GPTQT's format without its GPTQ pass), PoT W3
# with PoTPTQ's absmax scales (--steps none: its data-free scale search took ~12 minutes per layer
# at this width when this script was written, 64 s since it searches blocks of rows:
# benchmarks/pot_init_time.py); where the codes come from does not change the speed.
#
#   bash benchmarks/e2e_synthetic.sh [OUT_JSONL] [MODEL ...]   (the [bench] extra; nothing else running)
set -euo pipefail
OUT=${1:-benchmarks/results/e2e/e2e_synthetic4096x8_$(date +%F).jsonl}
shift || true
WORK=${ANYBIT_E2E_WORK:-/tmp}
A=${ANYBIT:-anybit}
PY=${PYTHON:-python}
SRC=$WORK/syn4096
[ -f "$SRC/config.json" ] || $PY benchmarks/synthetic_llama.py "$SRC" --layers 8 --gguf "$SRC.f16.gguf"
declare -A CMD=(
  [syn-w4]="--method rtn --wbits 4 --group-size 128"
  [syn-w3]="--method rtn --wbits 3 --group-size 128"
  [syn-w2]="--method rtn --wbits 2 --group-size 64"
  [syn-pot3]="--method potptq --wbits 3 --group-size 128 --steps none"
  [syn-bcq3]="--method bcq --bcq-fit greedy --wbits 3 --group-size 128"
  [syn-w6a6]="--method rtn --wbits 6 --abits 6 --group-size -1"
  [syn-w4a8]="--method rtn --wbits 4 --abits 8 --group-size -1"
)
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(syn-w4 syn-w3 syn-w2 syn-pot3 syn-bcq3 syn-w6a6 syn-w4a8)
mkdir -p "$(dirname "$OUT")"
for name in "${MODELS[@]}"; do
  [ -f "$WORK/$name/config.json" ] || $A quantize "$SRC" ${CMD[$name]} --lm-head-bits 8 --stream --out "$WORK/$name" --quiet
  grep -q "\"$WORK/$name\"" "$OUT" 2>/dev/null && continue
  $A bench e2e "$WORK/$name" --baseline "$SRC" --llama-source "$SRC.f16.gguf" --against llama.cpp \
    --prompt-tokens 64 --new-tokens 16 --reps 1 --rounds 2 --threads 2 --json >> "$OUT"
done
