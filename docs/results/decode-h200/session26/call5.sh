#!/bin/bash
# Session 26's fifth call (one H200): the kernel tables' method. Every earlier kernel row replayed one case's call
# back to back, so that a call could find in L2 what the last one read; call 4's profile has the 8-bit GQA kernel
# at 110.8 us a layer in generate() at 128 x 4k where its table row says 92.9. The GQA kernel (bf16 and 8-bit) and
# the 8-bit partial-RoPE kernel at their defaults, each timed both ways: --l2 warm (as before) and --l2 cold (the
# calls over copies of the case in turn, 8 L2 caches' worth of distinct bytes).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call5.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call5.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call5.log"
}
for l2 in warm cold; do
  run gqa8-$l2 80 --part gqa --batch 64 128 --context 4096 16384 --l2 $l2
  run partial8-$l2 70 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 \
    --cache-bits 8 --l2 $l2
done
grep -a "B=\|relative\|exit\|Error" "$OUT/call5.log"
