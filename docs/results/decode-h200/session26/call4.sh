#!/bin/bash
# Session 26's fourth call (one H200, carry [.whl]): end to end with the partial-RoPE kernel's new defaults (split
# columns, int8 rotary scores, a 128-register cap for four programs an SM): the 8-bit partial-RoPE layout at both of
# the shapes, against the original layout in kvforge; at B=32 x 16k every layout of call 3; then a profile of
# the 8-bit original layout's step at 128 x 4k (5.65 ms a step in call 3 against bf16's 5.06, though its attention
# kernel is faster per layer).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call4.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call4.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call4.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128 130 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants standard-static partial-rope-25-int8-static
run k32 300 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants standard-static standard-int8-static \
  partial-rope-25-int8-static partial-rope-25-static window-static merged-heads-static
run p128-int8 100 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants standard-int8-static --profile 24
grep -a "B=\|ms/step\|exit\|Error\|device kernels" "$OUT/call4.log"
