#!/bin/bash
# Session 26's third call (one H200, carry [.whl]): the 8-bit partial-RoPE kernel (split columns and int8 rotary
# scores now its defaults) with its scales a tile ahead (prefetch_scales) and with registers capped at 128 for four
# programs an SM (max_registers, programs_per_sm 4); then end to end at B=128 x 4k with this session's defaults:
# the original layout in kvforge (the GQA kernel, three stages for bf16), its 8-bit cache (int8 scores, first timed
# end to end), the 8-bit partial-RoPE layout that keeps its quality, its bf16 form, windows (the ring write's final
# form, first timed) and merged heads.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call3.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call3.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call3.log"
}
run partial8-occupancy 150 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 \
  --cache-bits 8 --prefetch-scales 0 1 --max-registers 0 128 --programs-per-sm 0 4
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128 400 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants standard-static standard-int8-static \
  partial-rope-25-int8-static partial-rope-25-static window-static merged-heads-static
grep -a "B=\|relative\|ms/step\|exit\|Error" "$OUT/call3.log"
