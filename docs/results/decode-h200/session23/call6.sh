#!/bin/bash
# Session 23's sixth call (one H200, no carry): the 8-bit partial-RoPE kernel's defaults (half_products, three
# programs per SM) after its float16 operands are scaled by powers of two (the queries by their largest, the value
# weights by the split's largest latent scale, read ahead: 2 bytes a slot); call 2's pps3_hp1 column was the same
# kernel without that.
set -u
echo "== partial8-scaled" >> "$OUT/call6.log"
timeout 200 bash benchmarks/device_run.sh launch/benchmark_decode.py --part partial --batch 64 128 \
  --context 4096 16384 --kv-rank 96 --rope-dims 32 --cache-bits 8 --json "$OUT/partial8-scaled.json" \
  >> "$OUT/call6.log" 2>&1 || echo "partial8-scaled: exit $?" >> "$OUT/call6.log"
grep -a "B=\|relative\|exit\|Error" "$OUT/call6.log"
