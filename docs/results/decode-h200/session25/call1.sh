#!/bin/bash
# Session 25's first call (one H200, carry [.whl]): the GQA kernel (dense, merged heads, windows) against kvforge's
# PyTorch path (torch_kv: what KVFORGE_KERNELS=auto runs for these layers today) per layer, bf16, 8-bit and 4-bit
# caches, with its tiles and waves; then the same A/B end to end (exported directory, compiled static step).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call1.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call1.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call1.log"
}
run gqa8 150 --part gqa --batch 64 128 --context 4096 16384 --block-s 64 128 --programs-per-sm 0 3 4 --whole-waves 1
run gqa4 100 --part gqa --batch 64 128 --context 4096 16384 --cache-bits 4 --block-s 64 128
run k128-standard 240 --part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports \
  --gen-batch 128 --gen-prompt 4096 --gen-variants standard-static standard-triton-static
grep -a "B=\|relative\|ms/step\|exit\|Error" "$OUT/call1.log"
