#!/bin/bash
# Session 23's fourth call (one H200, carry [.whl]): generate() of the exported 8-bit partial-RoPE layout
# (partial-rope-25-int8-long's, rank 96 + 3 x 32 rotary dims) with the kernel's new defaults (half_products, three
# programs per SM), at session 22's two shapes (then 6.41 ms per step at 32 x 16k, 6.27 at 128 x 4k).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call4.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call4.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call4.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128-partial-rope-25-int8 150 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants partial-rope-25-int8-static
run k32-partial-rope-25-int8 220 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants partial-rope-25-int8-static
grep -a "ms/step\|tokens/s\|exit\|Error" "$OUT/call4.log" | tail -20
