#!/bin/bash
# Session 24's third call (one H200, no carry): carried_tiles faults with the slots as the rows (call 2, every
# variant: bf16, 8-bit, one stage, no prefetch) and runs with the heads as the rows; time that pairing against
# the default (slot rows, in-iteration conversion) at the trained 8-bit layout.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call3.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call3.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call3.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8"
run partial8-default 150 $shapes
run partial8-carried-head-rows 250 $shapes --slot-rows 0 --carried-tiles 0 1 --programs-per-sm 3 4
grep -a "B=\|relative\|exit\|Error" "$OUT/call3.log"
