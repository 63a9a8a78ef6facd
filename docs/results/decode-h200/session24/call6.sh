#!/bin/bash
# Session 24's sixth call (one H200, no carry): the pre-RoPE latent kernel over an 8-bit cache (lr25-int8's ranks
# 48 / 144) with the heads as the rows against its default slot rows, as call 3 found for the partial-RoPE kernel.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call6.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call6.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call6.log"
}
run latent8-rows 300 --part latent --batch 64 128 --context 4096 16384 --k-rank 48 --v-rank 144 --cache-bits 8 \
  --slot-rows 0 1 --programs-per-sm 0 3
grep -a "B=\|relative\|exit\|Error" "$OUT/call6.log"
