#!/bin/bash
# Session 23's seventh call (one H200, carry [.whl]): the 12.5% model's largest batch at 32k, whose bisection
# (576 fits, 672 does not, session 16) was cut by the device time; from 576, as call 5's search.
set -u
echo "== max-batch-lr12" >> "$OUT/call7.log"
timeout 440 bash benchmarks/device_run.sh launch/benchmark_decode.py --part max-batch --gen-prompt 32768 \
  --prefill-chunk 4096 --batch-start 576 --gen-variants lr12-int4-aligned-static \
  --json "$OUT/max-batch-lr12.json" >> "$OUT/call7.log" 2>&1 || echo "max-batch-lr12: exit $?" >> "$OUT/call7.log"
grep -a "batch\|exit\|Error" "$OUT/call7.log" | tail -20
