#!/bin/bash
# Waits up to $1 seconds (default 540) for run.sh to finish, printing progress; results to $OUT/results.tgz.
K=$HOME/kvgpu
end=$(( $(date +%s) + ${1:-540} ))
while [ "$(date +%s)" -lt "$end" ] && ! grep -q "ALL DONE" "$K/pipeline.log" 2>/dev/null; do sleep 15; done
cat "$K/pipeline.log"
for f in "$K"/results/*.train.log; do [ -f "$f" ] && { echo "== $f"; tr '\r' '\n' < "$f" | grep -a "teacher-samples\|step .*: eval\|tokens/s\|stage \|error\|Error" | tail -8 | cut -c1-400
  tr '\r' '\n' < "$f" | grep -a "tok_s=" | tail -1 | cut -c1-200; }; done  # the progress bar's last line
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
tar czf "$OUT/results.tgz" -C "$K" results  # one file: a call brings back at most 8
# SAVE_SAMPLES=1: the teacher samples too, for a later session to carry back into $KVFORGE_CACHE/data.
if [ -n "${SAVE_SAMPLES:-}" ] && ls -d "$K"/cache/data/teacher-samples-* > /dev/null 2>&1; then
  (cd "$K/cache/data" && tar cf - teacher-samples-* | xz -T8 -6 > "$OUT/teacher-samples.tar.xz"); ls -la "$OUT/teacher-samples.tar.xz"
fi
