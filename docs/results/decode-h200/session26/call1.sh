#!/bin/bash
# Session 26's first call (one H200): the queued 8-bit partial-RoPE A/B (the rotary score product in int8,
# int8_scores, built after session 25's device time) at partial-rope-25-int8-long's layout; then the 8-bit GQA
# kernel's tiles (256 slots: a tile's bytes as a bf16 128-slot tile's), warps and stages.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call1.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call1.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call1.log"
}
run partial8-int8-scores 150 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 \
  --cache-bits 8 --int8-scores 0 1
run gqa8-tiles 200 --part gqa --batch 64 128 --context 4096 16384 --cache-bits 8 --block-s 128 256 --num-warps 4 8 \
  --num-stages 2 3
grep -a "B=\|relative\|exit\|Error" "$OUT/call1.log"
