#!/bin/bash
# One session on a 2-H200 host (nvidia-h200-x2) as one background pipeline, both GPUs busy throughout:
#   A: issue 14's 1-GPU runs on GPU 0 while issue 10's first recovery recipes run on GPU 1 (the shared-rotary MLA
#      recipe first, then its DeepSeek-V3 stock export scored beside the kvforge one: issue 15);
#   B: issue 14's 2-GPU runs, then compare.py (tables, and each consolidated export against the trained model);
#   C: the remaining recovery recipes, split over the two GPUs, and issue 12's decode rows.
# Started by `PIPELINE=docs/results/multigpu-h200/x2-session.sh bash docs/results/recovery-h200/setup.sh start`
# (after `setup.sh part00`), so it runs from $K/repo and logs to $K/pipeline.log; poll.sh follows it (its "ALL
# DONE" is this script's last line; the sub-pipelines log to $K/pipeline-gpu*.log).
# Env: FIRST, QUEUE0, QUEUE1, LATER1 (recipes), MULTIGPU_RUNS (run.sh's ONLY: which of its runs), REXTRA (overrides
# for the recovery runs only).
set -u
K=${K:-$HOME/kvgpu}
R=docs/results
FIRST=${FIRST:-partial-rope-shared-25}
THEN1=${THEN1:-partial-rope-25}  # on GPU 1 after FIRST and its stock export, still in phase A
QUEUE0=${QUEUE0:-lowrank-12 merged-heads-33 window-lowrank-12}
QUEUE1=${QUEUE1:-mixattention-ma shared-attention}
LATER1=${LATER1:-lowrank-50}  # after the decode rows on GPU 1
stamp() { echo "$(date +%T) $*"; }

recovery() {  # gpu master_port recipes: one recovery pipeline on one GPU, its own port and log
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

decode() {  # issue 12's missing rows: the original under transformers' static cache + compile, 5 repeats
  [ -f "$K/results/decode.json" ] && return 0
  stamp "decode rows on GPU 1"
  CUDA_VISIBLE_DEVICES=1 python3 launch/benchmark_decode.py --part generate --gen-batch 128 --gen-variants original \
    original-static lr50-static --repeats 5 --json "$K/results/decode.json" > "$K/results/decode.log" 2>&1 \
    || stamp "decode FAILED"
}

stamp "A: the 1-GPU runs on GPU 0; $FIRST (then its stock export) and $THEN1 on GPU 1"
{ recovery 1 29511 "$FIRST"; mla_export 1; recovery 1 29511 "$THEN1"; } &
EXTRA= PHASE=1 ONLY="${MULTIGPU_RUNS:-}" bash $R/multigpu-h200/run.sh
wait
stamp "B: the 2-GPU runs"
EXTRA= PHASE=2 ONLY="${MULTIGPU_RUNS:-}" bash $R/multigpu-h200/run.sh
python3 $R/multigpu-h200/compare.py "$K/multigpu" > "$K/multigpu/compare.txt" 2>&1
cat "$K/multigpu/compare.txt"
stamp "C: $QUEUE0 on GPU 0; $QUEUE1, decode, $LATER1 on GPU 1"
recovery 0 29512 "$QUEUE0" &
{ recovery 1 29513 "$QUEUE1"; decode; recovery 1 29513 "$LATER1"; } &
wait
stamp "ALL DONE"
