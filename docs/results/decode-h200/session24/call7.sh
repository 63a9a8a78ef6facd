#!/bin/bash
# Session 24's seventh call (one H200, carry [.whl]): merged heads' (3 -> 1 KV heads, a third of the cache) largest
# batch at 32k, never run: generate() of 32,768-token prompts prefilled 4,096 at a time, doubled from 264 until a
# batch does not fit, then bisected.
set -u
echo "== max-batch-merged-heads" >> "$OUT/call7.log"
timeout 500 bash benchmarks/device_run.sh launch/benchmark_decode.py --part max-batch --gen-prompt 32768 \
  --prefill-chunk 4096 --batch-start 264 --gen-variants merged-heads-static \
  --json "$OUT/max-batch-merged-heads.json" >> "$OUT/call7.log" 2>&1 || echo "max-batch: exit $?" >> "$OUT/call7.log"
grep -a "batch\|exit\|Error" "$OUT/call7.log" | tail -20
