#!/bin/bash
# Session 24's first call (one H200, no carry): the 8-bit partial-RoPE kernel (rank 96 + 3 x 32 rotary dims, the
# trained layout) with carried_tiles (each tile loaded and converted an iteration ahead and carried into the next,
# so both products read it from shared memory; offline sm_90: 739 instructions per tile, 219 registers) against
# session 23's default (half products, in-iteration conversion), at two and three programs per SM.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call1.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call1.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call1.log"
}
shapes="--part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8"
run partial8-carried 280 $shapes --carried-tiles 0 1 --programs-per-sm 2 3
grep -a "B=\|relative\|exit\|Error" "$OUT/call1.log"
