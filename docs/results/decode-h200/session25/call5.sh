#!/bin/bash
# Session 25's fifth call (one H200, carry [.whl]): the window layout's step profiled again after the ring write's
# change (call 4: 6.06 -> 5.96 ms a step at 128 x 4k, so the whole-ring copies were not that write's, or not only).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call5.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call5.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call5.log"
}
run p128-window 200 --part generate --repeats 1 --compile-step --via-export /tmp/kv-decode-exports --profile 24 \
  --gen-batch 128 --gen-prompt 4096 --gen-variants window-static
grep -a "B=\|ms/step\|exit\|Error\|decode steps" "$OUT/call5.log"
