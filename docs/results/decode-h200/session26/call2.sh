#!/bin/bash
# Session 26's second call (one H200): the 8-bit partial-RoPE kernel (partial-rope-25-int8-long's layout, int8
# rotary scores now its default) with its latent's 96 columns as one 128-column tile or as 64 + 32 (split_columns;
# offline sm_90: 575 -> 585 loop instructions, 32 rather than 40 MMAs, 40 -> 33 KiB); then Nsight Compute on both
# at 128 x 4k: where its warps wait.
set -u
run() {  # name seconds args...
  local name=$1 limit=$2; shift 2
  echo "== $name" >> "$OUT/call2.log"
  timeout "$limit" bash benchmarks/device_run.sh launch/benchmark_decode.py "$@" --json "$OUT/$name.json" \
    >> "$OUT/call2.log" 2>&1 || echo "$name: exit $?" >> "$OUT/call2.log"
}
run partial8-split 150 --part partial --batch 64 128 --context 4096 16384 --kv-rank 96 --rope-dims 32 \
  --cache-bits 8 --split-columns 0 1
KERNEL=partial timeout 300 bash benchmarks/profile_ncu.sh "$OUT/ncu" 128 4096 default split:split_columns=1 \
  >> "$OUT/call2.log" 2>&1 || echo "ncu: exit $?" >> "$OUT/call2.log"
rm -f "$OUT"/ncu/*.ncu-rep
grep -a "B=\|relative\|exit\|Error\|Duration\|Throughput\|Occupancy\|Warp Cycles\|Issue Slots\|SASS lines" "$OUT/call2.log"
