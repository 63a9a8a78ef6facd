#!/bin/bash
# Session 22's third call (one H200, carry [.whl]): the 8-bit partial-RoPE kernel with word loads (after call 2
# found Triton's own int8 conversion at 17-21% of the copy bandwidth), at three and four programs per SM (offline
# sm_90: 158 registers with word loads, 204 without); then generate() of the exported 8-bit partial-RoPE layout
# (call 2's rows failed on the recipe's data paths, fixed since).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call4.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call4.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call4.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
: run partial8-words 150 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 \
: --cache-bits 8 --word-loads 0 1 --programs-per-sm 3 4
run k128-partial-rope-25-int8 130 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants partial-rope-25-int8-static
run k32-partial-rope-25-int8 200 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants partial-rope-25-int8-static
grep -a "B=\|relative\|exit" "$OUT/call4.log"
