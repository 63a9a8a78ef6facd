#!/bin/bash
# Waits up to $1 seconds (default 540) for run.sh to finish, printing progress; results to $OUT/results.tgz.
K=$HOME/kvgpu
end=$(( $(date +%s) + ${1:-540} ))
# The pipeline's own last line (a session script's sub-pipelines print "ALL DONE" in the middle of it).
while [ "$(date +%s)" -lt "$end" ] && ! tail -n 1 "$K/pipeline.log" 2>/dev/null | grep -q "ALL DONE"; do sleep 15; done
cat "$K/pipeline.log"
for f in "$K"/results/*.train.log; do [ -f "$f" ] && { echo "== $f"; tr '\r' '\n' < "$f" | grep -a "teacher-samples\|step .*: eval\|tokens/s\|stage \|error\|Error" | tail -8 | cut -c1-400
  tr '\r' '\n' < "$f" | grep -a "tok_s=" | tail -1 | cut -c1-200; }; done  # the progress bar's last line
for f in "$K"/pipeline-gpu*.log; do [ -f "$f" ] && { echo "== $f"; tail -4 "$f"; }; done  # x2-session.sh's pipelines
for f in "$K"/multigpu/*.log; do [ -f "$f" ] && { echo "== $f"; tr '\r' '\n' < "$f" | grep -a "step .*: eval\|teacher: \|Error\|error" | tail -3 | cut -c1-300
  tr '\r' '\n' < "$f" | grep -a "tok_s=" | tail -1 | cut -c1-200; }; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
# A run still going (or cut off by the device time, as session 13's last suite was): its metrics so far.
for m in "$K"/runs/*/metrics.jsonl; do
  [ -f "$m" ] || continue
  r=$(basename "$(dirname "$m")")
  [ -f "$K/results/$r.metrics.jsonl" ] || cp "$m" "$K/results/$r.metrics.partial.jsonl"
done
# One file (a call brings back at most 8): results, and the multi-GPU runs without their weights and logits.
(cd "$K" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  --exclude='checkpoints' results $(ls -d multigpu pipeline*.log 2>/dev/null))
# SAVE_SAMPLES=1: the teacher samples too, for a later session to carry back into $KVFORGE_CACHE/data.
if [ -n "${SAVE_SAMPLES:-}" ] && ls -d "$K"/cache/data/teacher-samples-* > /dev/null 2>&1; then
  (cd "$K/cache/data" && tar cf - teacher-samples-* | xz -T8 -6 > "$OUT/teacher-samples.tar.xz"); ls -la "$OUT/teacher-samples.tar.xz"
fi
