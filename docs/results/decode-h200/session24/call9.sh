#!/bin/bash
# Session 24's ninth call (one H200, no carry): the GQA kernel over an 8-bit cache, half products, its tiles and
# pipeline depth (offline sm_90 at 64-slot tiles: 482 loop instructions, 110 registers, about the bf16 cache's
# 461 / 94, yet call 8 found it slower than bf16 on half the bytes: each iteration brings half the bytes).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call9.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call9.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call9.log"
}
run gqa8-tiles 240 --part gqa --batch 64 128 --context 4096 16384 --half-products 1 --block-s 64 128 \
  --num-stages 2 3 4
grep -a "B=\|relative\|exit\|Error" "$OUT/call9.log"
