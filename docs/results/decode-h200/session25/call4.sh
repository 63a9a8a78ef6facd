#!/bin/bash
# Session 25's fourth call (one H200, carry [.whl]): window layouts after the ring write's fix (call 3's profile: per
# tensor, layer and step, a 25 us copy of the whole ring and a 24 us index_put over it, half of the step; now one
# index_copy_ into the ring viewed flat).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call4.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call4.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call4.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128-windows 250 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants window-static window-lowrank-12-static
run k32-windows 200 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants window-static window-lowrank-12-static
grep -a "B=\|ms/step\|exit\|Error" "$OUT/call4.log"
