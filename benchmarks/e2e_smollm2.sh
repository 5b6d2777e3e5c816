#!/usr/bin/env bash
# SmolLM2-135M (Q4_1-dequantized) end to end: prefill / decode tok/s and peak RSS of the float
# model and of one quantized model per format, next to llama.cpp on the same GGUF re-quantized
# to the nearest types, all from `anybit bench e2e --against llama.cpp` (alternating rounds,
# medians). The quantized heads are INT8 (--lm-head-bits 8), as llama.cpp keeps SmolLM2's tied
# embedding/output in Q8_0. Speed does not depend on the method that chose the codes, so the
# cheapest method of each format is used (RTN; PoTPTQ's data-free init; BCQ fitted from the
# float weights, the format GPTQT also writes).
#
#   bash benchmarks/e2e_smollm2.sh [OUT_JSONL]     (needs the [bench] extra; nothing else running)
set -euo pipefail
OUT=${1:-benchmarks/results/e2e/e2e_smollm2_$(date +%F).jsonl}
WORK=${ANYBIT_E2E_WORK:-/tmp/anybit-e2e}
A=${ANYBIT:-anybit}
mkdir -p "$WORK" "$(dirname "$OUT")"
declare -A CMD=(
  [int4g128]="--method rtn --wbits 4 --group-size 128"
  [int3g128]="--method rtn --wbits 3 --group-size 128"
  [int2g64]="--method rtn --wbits 2 --group-size 64"
  [pot3g128]="--method potptq --wbits 3 --group-size 128 --steps init"
  [bcq3g128]="--method bcq --wbits 3 --group-size 128"
  [w6a6]="--method rtn --wbits 6 --abits 6 --group-size -1"
  [w4a8]="--method rtn --wbits 4 --abits 8 --group-size -1"
)
for name in int4g128 int3g128 int2g64 pot3g128 bcq3g128 w6a6 w4a8; do
  [ -f "$WORK/$name/config.json" ] || $A quantize smollm2-135m ${CMD[$name]} --lm-head-bits 8 --out "$WORK/$name" --quiet
  grep -q "\"$WORK/$name\"" "$OUT" 2>/dev/null && continue
  $A bench e2e "$WORK/$name" --against llama.cpp --threads 2 --reps 1 --rounds 3 --json >> "$OUT"
done
