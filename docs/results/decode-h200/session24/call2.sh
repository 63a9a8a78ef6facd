#!/bin/bash
# Session 24's second call (one H200, no carry): which partial-RoPE settings fault (call 1's illegal address).
set -u
timeout 400 bash benchmarks/device_run.sh docs/results/decode-h200/session24/carried_check.py > "$OUT/call2.log" 2>&1
cat "$OUT/call2.log"
