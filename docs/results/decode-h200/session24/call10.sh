#!/bin/bash
# Session 24's tenth call (one H200, carry [.whl]): the 8-bit GQA kernel's tiles past 128 slots and its warps
# (call 9: 128-slot tiles at two stages 1.3-1.5x faster than 64), then generate() of the original layout in 8 bits
# with the new default (128-slot tiles for an int8 cache).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call10.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call10.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call10.log"
}
run gqa8-tiles256 150 --part gqa --batch 64 128 --context 4096 16384 --half-products 1 --block-s 128 256 \
  --num-warps 4 8
run k128-standard-int8 150 --part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports \
  --gen-batch 128 --gen-prompt 4096 --gen-variants standard-int8-triton-static
grep -a "B=\|relative\|ms/step\|exit\|Error" "$OUT/call10.log"
