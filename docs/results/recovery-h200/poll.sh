#!/bin/bash
# Waits up to $1 seconds (default 540) for run.sh to finish, printing progress; copies results to $OUT.
K=$HOME/kvgpu
end=$(( $(date +%s) + ${1:-540} ))
while [ "$(date +%s)" -lt "$end" ] && ! grep -q "ALL DONE" "$K/pipeline.log" 2>/dev/null; do sleep 15; done
cat "$K/pipeline.log"
for f in "$K"/results/*.train.log; do [ -f "$f" ] && { echo "== $f"; grep -a "teacher-samples\|step .*: eval\|tokens/s\|error\|Error" "$f" | tr '\r' '\n' | tail -8 | cut -c1-400; }; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
mkdir -p "$OUT/results" && cp -r "$K"/results/* "$OUT/results/" 2>/dev/null
