#!/bin/bash
# Session 22's second call (one H200, carry [.whl]): the partial-RoPE kernel on an 8-bit cache (the layout of
# configs/recovery/partial-rope-25-int8-long.yaml: rank 96 beside 3 x 32 rotary dims), then end to end through
# generate() of exported directories with the compiled step and the cache kept: that layout, and the 25% pre-RoPE
# model again under the latent kernel's new defaults (two programs per SM in whole waves).
#   bash docs/results/decode-h200/session22/call2.sh    # from the repo root; JSON and one log into $OUT
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call2.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call2.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call2.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run partial8 120 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8
run k32-partial-rope-25-int8 150 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants partial-rope-25-int8-static
run k128-partial-rope-25-int8 150 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants partial-rope-25-int8-static
run k32-lr25 150 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants lr25-int8-aligned-static
run k128-lr25 150 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants lr25-int8-aligned-static
tail -c 6000 "$OUT/call2.log"
