#!/bin/bash
# Session 24's fifth call (one H200, carry [.whl]): generate() of the exported 8-bit partial-RoPE layout with the
# kernel's new default for 8-bit caches (heads as the rows at three programs per SM; call 3: 10-20% faster).
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call5.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call5.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call5.log"
}
gen="--part generate --repeats 3 --compile-step --via-export /tmp/kv-decode-exports"
run k128-partial-rope-25-int8 170 $gen --gen-batch 128 --gen-prompt 4096 --gen-variants partial-rope-25-int8-static
run k32-partial-rope-25-int8 240 $gen --gen-batch 32 --gen-prompt 16384 --gen-variants partial-rope-25-int8-static
grep -a "ms\|tok\|exit\|Error" "$OUT/call5.log" | tail -20
