#!/bin/bash
# Session 23's fifth call (one H200, carry [.whl]): issue 12's largest batch at 32k context for the two 25%
# partial-RoPE layouts (generate() of 32,768-token prompts prefilled 4,096 at a time and 4 new tokens; doubled from
# 384 until one does not fit, then bisected). Session 17's rows: the original 92, lr25-int8 416.
set -u
echo "== max-batch" >> "$OUT/call5.log"
timeout 540 bash benchmarks/device_run.sh launch/benchmark_decode.py --part max-batch --gen-prompt 32768 \
  --prefill-chunk 4096 --batch-start 384 --gen-variants partial-rope-25-int8-static partial-rope-25-static \
  --json "$OUT/max-batch.json" >> "$OUT/call5.log" 2>&1 || echo "max-batch: exit $?" >> "$OUT/call5.log"
grep -a "batch\|exit\|Error" "$OUT/call5.log" | tail -30
