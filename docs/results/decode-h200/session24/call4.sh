#!/bin/bash
# Session 24's fourth call (one H200, no carry): call 3 found the heads as the rows (16, mma.sync) at three programs
# per SM 10-20% faster than the default slot rows at all eight shapes; its tiles and warps.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call4.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call4.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call4.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8"
run partial8-head-rows-tiles 300 $shapes --slot-rows 0 --programs-per-sm 3 --block-s 32 64 128 --num-warps 4 8
grep -a "B=\|relative\|exit\|Error" "$OUT/call4.log"
