#!/bin/bash
# Session 25's third call (one H200, carry [.whl]): where a decode step's 5-6 ms go at B=128 x 4k (call 2: windows of
# 1,024 at 6.06 ms a step, slower than the original layout's 5.29 with four times the bytes; the 8-bit partial-RoPE
# layout 5.69 in session 24): a profiled generate() of 24 tokens per layout (ops by device time, and the wall beside
# the device's kernel time per step).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call3.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call3.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call3.log"
}
run p128 420 --part generate --repeats 1 --compile-step --via-export /tmp/kv-decode-exports --profile 24 \
  --gen-batch 128 --gen-prompt 4096 --gen-variants standard-static window-static partial-rope-25-int8-static
grep -a "B=\|ms/step\|exit\|Error\|decode steps" "$OUT/call3.log"
