#!/bin/bash
# Session 25's sixth call (one H200, carry [.whl]): windows with the per-row ring write run uncompiled on a GPU (call
# 5's profile: the index_copy_ of call 4 still compiled out of place, a copy of the whole ring and back per tensor,
# layer and step).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call6.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call6.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call6.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128-windows 250 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants window-static window-lowrank-12-static
grep -a "B=\|ms/step\|exit\|Error" "$OUT/call6.log"
