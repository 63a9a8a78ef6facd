#!/bin/bash
# Session 23's third call (one H200, no carry): call 2's fastest 8-bit partial-RoPE setting (half_products, three
# programs per SM: 26% of the copy bandwidth at 128 x 16k) against deeper pipelining and larger tiles (offline
# sm_90: 64-slot tiles at three stages 72 KiB of shared memory; 128-slot tiles over 8 warps 154 registers, 104 KiB).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call3.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call3.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call3.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8 --half-products 1"
run partial8-stages 150 $shapes --programs-per-sm 3 --num-stages 2 3
run partial8-tiles128 150 $shapes --block-s 128 --num-warps 8 --programs-per-sm 1 2
grep -a "B=\|relative\|exit\|Error" "$OUT/call3.log"
