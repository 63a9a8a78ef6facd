#!/bin/bash
# One session on a 2-H200 host (nvidia-h200-x2) as one background pipeline, both GPUs busy throughout, the most
# needed runs first (whatever the device time leaves undone is what comes last). Order since session 8 (session 7's
# order left issue 14 unfinished because its multi-GPU runs took 3.5-8 minutes each, not 2):
#   A: GPU 0: the shared-rotary MLA recipe (FIRST0), its DeepSeek-V3 stock export scored beside the kvforge one
#      (issue 15), then issue 12's decode rows; GPU 1 meanwhile: issue 14's 1-GPU runs (MULTIGPU1);
#   B: issue 14's 2-GPU runs (MULTIGPU2), then compare.py (tables; each export against the trained model);
#   C: the remaining recovery recipes in two queues, one per GPU (QUEUE0, QUEUE1).
# The decode rows share the host with a training run on the other GPU (32 cores, separate GPUs and memory).
# Started by `PIPELINE=docs/results/multigpu-h200/x2-session.sh bash docs/results/recovery-h200/setup.sh start`
# (after `setup.sh part00`), so it runs from $K/repo and logs to $K/pipeline.log; poll.sh follows it (its "ALL
# DONE" is this script's last line; the sub-pipelines log to $K/pipeline-gpu*.log and $K/multigpu/).
# Env: FIRST0, QUEUE0, QUEUE1 (recipes), MULTIGPU1/2 (multigpu-h200/run.sh's runs), REXTRA (overrides for the
# recovery runs only).
set -u
K=${K:-$HOME/kvgpu}
R=docs/results
FIRST0=${FIRST0:-partial-rope-shared-25}
QUEUE0=${QUEUE0:-lowrank-12 merged-heads-33 window-lowrank-12}
QUEUE1=${QUEUE1:-partial-rope-25 mixattention-ma shared-attention lowrank-50}
MULTIGPU1=${MULTIGPU1:-z3-1gpu big-z3-1gpu}
MULTIGPU2=${MULTIGPU2:-z3-2gpu big-z3-2gpu}
stamp() { echo "$(date +%T) $*"; }

recovery() {  # gpu master_port recipes: one recovery pipeline on one GPU, its own port and log
  [ -n "$3" ] || return 0  # run.sh's RECIPES="" would mean its default list
  CUDA_VISIBLE_DEVICES=$1 LAUNCH="--master_port $2" RECIPES="$3" SKIP_ORIGINAL=1 EXTRA="${REXTRA:-}" \
    bash $R/recovery-h200/run.sh >> "$K/pipeline-gpu$1.$2.log" 2>&1
}

mla_export() {  # issue 15: the recovered shared-rotary model written as DeepSeek-V3, scored beside its kvforge export
  local gpu=$1 run=$K/runs/partial-rope-shared-25 out=$K/results/mla-export
  [ -d "$run/hf_model" ] && [ ! -f "$out/evaluate-kvforge.json" ] || return 0
  mkdir -p "$out"
  CUDA_VISIBLE_DEVICES=$gpu python3 launch/export.py --model "$run/hf_model" --out "$K/exports/mla-stock" --format stock \
    --dtype float32 --overwrite > "$out/export.log" 2>&1 || { stamp "stock export FAILED"; tail -5 "$out/export.log"; return 0; }
  cp "$K/exports/mla-stock/kvforge_export.json" "$out/export-stock.json"
  for m in stock:"$K/exports/mla-stock" kvforge:"$run/hf_model"; do
    CUDA_VISIBLE_DEVICES=$gpu python3 launch/evaluate.py --model "${m#*:}" --task perplexity --data "$K/fortunes" \
      --seq-len 2048 --batch-size 8 --max-batches 6 --dtype float32 --json "$out/evaluate-${m%%:*}.json" \
      > "$out/evaluate-${m%%:*}.log" 2>&1 || stamp "evaluate ${m%%:*} FAILED"
  done
  stamp "stock export scored: $(cat "$out"/evaluate-*.json | tr -d '\n' | cut -c1-300)"
}

multigpu() {  # gpu runs: issue 14's 1-GPU runs named, on one GPU (multigpu-h200/run.sh's ONE_GPU)
  [ -n "$2" ] && EXTRA= PHASE=1 ONLY="$2" ONE_GPU=$1 bash $R/multigpu-h200/run.sh
}

decode() {  # issue 12's missing rows: the original under transformers' static cache + compile, 5 repeats
  [ -f "$K/results/decode.json" ] && return 0
  stamp "decode rows"
  CUDA_VISIBLE_DEVICES=0 python3 launch/benchmark_decode.py --part generate --gen-batch 128 --gen-variants original \
    original-static lr50-static --repeats 5 --json "$K/results/decode.json" > "$K/results/decode.log" 2>&1 \
    || stamp "decode FAILED"
}

stamp "A: $FIRST0 (then its stock export), decode rows on GPU 0; $MULTIGPU1 on GPU 1"
{ recovery 0 29512 "$FIRST0"; mla_export 0; decode; } &
{ multigpu 1 "$MULTIGPU1"; } &
wait
stamp "B: $MULTIGPU2"
[ -n "$MULTIGPU2" ] && EXTRA= PHASE=2 ONLY="$MULTIGPU2" bash $R/multigpu-h200/run.sh
python3 $R/multigpu-h200/compare.py "$K/multigpu" > "$K/multigpu/compare.txt" 2>&1
cat "$K/multigpu/compare.txt"
stamp "C: $QUEUE0 on GPU 0; $QUEUE1 on GPU 1"
{ recovery 0 29512 "$QUEUE0"; } &
{ recovery 1 29513 "$QUEUE1"; } &
wait
stamp "ALL DONE"
