#!/bin/bash
# Session 25's seventh call (one H200, carry [.whl]): the window layout after the ring write's fix at 16k context
# (call 6: 3.33 ms a step at 128 x 4k), whose step should not grow with the context: B=128 and B=32.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call7.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call7.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call7.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128x16k-window 170 $gen --gen-batch 128 --gen-prompt 16384 --gen-variants window-static
run k32-window 100 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants window-static
grep -a "B=\|ms/step\|exit\|Error" "$OUT/call7.log"
