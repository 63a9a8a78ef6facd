#!/bin/bash
# Session 23's second call (one H200, no carry): call 1's half_products (3-7% faster) with the int8 -> float16
# permutes declared impure, so Triton converts each tile once where it was loaded rather than in the products'
# operand layout (offline sm_90: 1,228 -> 667 loop instructions per tile, 194 -> 167 registers: three programs
# fit an SM); at three and four programs per SM, slots or heads as the rows.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call2.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call2.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call2.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8"
run partial8-impure 250 $shapes --half-products 0 1 --programs-per-sm 3 4
run partial8-impure-head-rows 150 $shapes --half-products 1 --slot-rows 0
grep -a "B=\|relative\|exit\|Error" "$OUT/call2.log"
