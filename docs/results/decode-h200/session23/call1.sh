#!/bin/bash
# Session 23's first call (one H200, no carry): the 8-bit partial-RoPE kernel (rank 96 + 3 x 32 rotary dims, the
# trained layout) with float16 products over tiles made float16 by byte permutes (half_products), against
# Triton's conversion; with the slots as the rows (the default), and with the heads padded to 64 as the rows
# (offline sm_90: then the int8 tiles come through cp.async and are converted once into shared memory, both
# products reading them there).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call1.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call1.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call1.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8"
run partial8-half-slot-rows 200 $shapes --half-products 0 1
run partial8-half-head-rows 200 $shapes --half-products 0 1 --slot-rows 0 --block-h 64
grep -a "B=\|relative\|exit\|Error" "$OUT/call1.log"
