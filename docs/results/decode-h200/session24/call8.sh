#!/bin/bash
# Session 24's eighth call (one H200, carry [.whl]): the dense GQA kernel over an 8-bit cache with half products
# (int8 tiles made float16 where loaded, float16 products, operands scaled by powers of two) against Triton's
# conversion (session 13: the int8 cache decoded in twice the bf16 one's time), then generate() of the original
# layout in 8 bits through that kernel, beside the bf16 layout.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call8.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call8.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call8.log"
}
run gqa8 150 --part gqa --batch 64 128 --context 4096 16384 --half-products 0 1
run k128-standard 260 --part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports \
  --gen-batch 128 --gen-prompt 4096 \
  --gen-variants standard-triton-static standard-int8-triton-static
grep -a "B=\|relative\|ms/step\|exit\|Error" "$OUT/call8.log"
