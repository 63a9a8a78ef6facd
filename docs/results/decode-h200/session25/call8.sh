#!/bin/bash
# Session 25's eighth call (one H200): the 8-bit GQA kernel's score product in int8 on the keys' bytes (int8_scores;
# offline sm_90: 717 loop instructions per 128-slot tile against 797 in float16), at 64- and 128-slot tiles.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call8.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call8.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call8.log"
}
run gqa8-int8-scores 150 --part gqa --batch 64 128 --context 4096 16384 --block-s 64 128 --int8-scores 0 1
grep -a "B=\|relative\|exit\|Error" "$OUT/call8.log"
