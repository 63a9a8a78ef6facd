#!/bin/bash
# Session 25's second call (one H200, carry [.whl]): end to end with the GQA kernel under auto (since call 1) and
# its new bf16 defaults (128-slot tiles, three programs per SM in whole waves): the original layout in kvforge at
# both of the shapes (the baseline that isolates what compression buys), its 8-bit cache (the fused write of
# head-major entries, first timed), windows and merged heads.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call2.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call2.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call2.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128-auto 330 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants standard-static standard-int8-static \
  window-static merged-heads-static
run k32-standard 150 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants standard-static
grep -a "B=\|ms/step\|exit\|Error" "$OUT/call2.log"
