#!/bin/bash
# One session on a 2-H200 host (nvidia-h200-x2) as one background pipeline, both GPUs busy throughout, the most
# needed runs first (whatever the device time leaves undone is what comes last). The order since session 12:
#   B: issue 14's 2-GPU runs (MULTIGPU2; none by default since issue 14 closed), then compare.py (tables; each
#      export against the trained model);
#   A: on GPU 0, FIRST0: 4-bit latents at 12.5% for 1,500 steps (issue 10's 12.5% target: windows beside 8-bit
#      latents reached +11.0% in session 11 but lost passkey at 4k; after surgery on the CPU 4-bit latents start at
#      +97% balanced, where those started at +140%). On GPU 1: FIRST1 (none by default), issue 12's decode rows
#      (DECODE_ARGS: where the 8-bit 25% model's decode time goes; the 32k window rows whose prefill ran out of
#      memory), issue 11's plain PyTorch loop on the trainer's batch (launch/benchmark_loss.py, ~2 min). Then
#      both GPUs take recipes from one shared QUEUE, each the next one when it is free (session 11's fixed
#      per-GPU queues left GPU 0 idle for its last 7 minutes);
#   C: the teacher sampler's speed with each attention path (SAMPLER_ATTENTION, none by default: measured in
#      session 11), on GPU 1.
# Recipe runs are where a session's minutes go (3-10 min each), so they come after the few short runs that close
# things.
# Started by `PIPELINE=docs/results/multigpu-h200/x2-session.sh bash docs/results/recovery-h200/setup.sh start`
# (after `setup.sh part00` and `setup.sh stage`), so it runs from $K/repo and logs to $K/pipeline.log; poll.sh follows it (its "ALL
# DONE" is this script's last line; the sub-pipelines log to $K/pipeline-gpu*.log and $K/multigpu/).
# Env: FIRST0 (a recipe first on GPU 0, followed by its DeepSeek-V3 export when it is partial-rope-shared-25), FIRST1
# (a recipe first on GPU 1), QUEUE (recipes, shared), MULTIGPU1/2 (multigpu-h200/run.sh's runs), REXTRA (overrides for
# the recovery runs only), DECODE_ARGS (launch/benchmark_decode.py's; empty: no decode rows), SAMPLER_ATTENTION,
# MAX_BATCH_VARIANTS (the largest batch at 32k, on GPU 1 once the queue is empty; empty: none).
set -u
K=${K:-$HOME/kvgpu}
R=docs/results
FIRST0=${FIRST0-lowrank-12-int4-long}
FIRST1=${FIRST1-}
QUEUE=${QUEUE-lowrank-25-int8-long-aligned lowrank-12-int4-long-aligned lowrank-12-int4-long-unbalanced \
finetuned-original-corpus-long partial-rope-50 partial-rope-12-int8 window-lowrank-12}
MULTIGPU1=${MULTIGPU1:-}
MULTIGPU2=${MULTIGPU2:-}
SAMPLER_ATTENTION=${SAMPLER_ATTENTION-}
MAX_BATCH_VARIANTS=${MAX_BATCH_VARIANTS-original lr50-static lr25-int8-static mixattention-static}
# The 8-bit 25% model decoded at 0.98x the original at B=32, S=16k in session 11 (the 50% bf16 one at 1.57x): the
# same cache through the PyTorch reference, the same ranks in bf16, and ranks on 16-byte boundaries say whether the
# kernel's int8 path, or the odd ranks, cost it. Then the window and MixAttention layouts at 32k (their prefill ran
# out of memory in session 11; fixed since) against 4k, whose window layers should decode in the same time.
DECODE_ARGS=${DECODE_ARGS-"--gen-batch 32 --gen-prompt 16384 --gen-variants lr25-int8-static lr25-int8-torch-static \
lr25-bf16-static lr25-int8-aligned-static lr50-static --repeats 3|\
--gen-batch 32 --gen-prompt 32768 --gen-variants window-static mixattention-static original-static --repeats 3|\
--gen-batch 128 --gen-prompt 4096 --gen-variants lr25-int8-aligned-static lr25-bf16-static --repeats 3"}
stamp() { echo "$(date +%T) $*"; }
mkdir -p "$K/results"

next_recipe() {  # the shared QUEUE's next recipe (empty when none is left), taken under a lock (mkdir is atomic)
  until mkdir "$K/queue.lock" 2>/dev/null; do sleep 0.2; done
  head -n 1 "$K/queue"
  sed -i 1d "$K/queue"
  rmdir "$K/queue.lock"
}

worker() {  # gpu master_port: recipes from the shared QUEUE on one GPU until none is left
  local recipe
  while recipe=$(next_recipe) && [ -n "$recipe" ]; do recovery "$1" "$2" "$recipe"; done
}

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

decode() {  # gpu: issue 12's missing rows, one launch/benchmark_decode.py run per "|"-separated argument set
  local gpu=$1 i=0 set
  IFS='|' read -r -a sets <<< "$DECODE_ARGS"
  for set in "${sets[@]}"; do
    i=$((i + 1))
    [ -f "$K/results/decode-$i.json" ] && continue
    stamp "decode rows $i: $set"
    read -r -a args <<< "$set"
    CUDA_VISIBLE_DEVICES=$gpu python3 launch/benchmark_decode.py --part generate "${args[@]}" \
      --json "$K/results/decode-$i.json" > "$K/results/decode-$i.log" 2>&1 || stamp "decode $i FAILED"
  done
}

max_batch() {  # gpu: issue 12's largest batch that fits at 32k context, per layout (last: it takes minutes)
  [ -n "$MAX_BATCH_VARIANTS" ] && [ ! -f "$K/results/max-batch.json" ] || return 0
  stamp "largest batches at 32k on GPU $1: $MAX_BATCH_VARIANTS"
  read -r -a variants <<< "$MAX_BATCH_VARIANTS"
  CUDA_VISIBLE_DEVICES=$1 python3 launch/benchmark_decode.py --part max-batch --gen-prompt 32768 \
    --gen-variants "${variants[@]}" --json "$K/results/max-batch.json" > "$K/results/max-batch.log" 2>&1 \
    || stamp "max-batch FAILED"
}

loss_rows() {  # gpu: issue 11's plain PyTorch loop on the trainer's batch (16 x 2,048), next to the recipe rows
  [ -f "$K/results/loss-plain-loop.json" ] && return 0
  stamp "plain-loop loss rows on GPU $1"
  CUDA_VISIBLE_DEVICES=$1 python3 launch/benchmark_loss.py --json "$K/results/loss-plain-loop.json" \
    > "$K/results/loss-plain-loop.log" 2>&1 || stamp "loss rows FAILED"
}

sampler() {  # the teacher sampler at 1,024 x 2,048 with each attention path, on GPU 1 (benchmarks/profile_sampler.py)
  local a
  for a in $SAMPLER_ATTENTION; do
    [ -f "$K/results/sampler-$a.txt" ] && continue
    stamp "sampler, attention $a"
    CUDA_VISIBLE_DEVICES=1 python3 benchmarks/profile_sampler.py \
      --model "$K/SmolLM2-135M-Instruct.Q4_1.gguf" --attention "$a" > "$K/results/sampler-$a.txt" 2>&1 \
      || stamp "sampler $a FAILED"
  done
}

stamp "B: ${MULTIGPU2:-no 2-GPU runs}"
if [ -n "$MULTIGPU2" ]; then
  EXTRA= PHASE=2 ONLY="$MULTIGPU2" bash $R/multigpu-h200/run.sh
  python3 $R/multigpu-h200/compare.py "$K/multigpu" > "$K/multigpu/compare.txt" 2>&1
  cat "$K/multigpu/compare.txt"
fi
stamp "A: ${FIRST0:+$FIRST0 on GPU 0; }${MULTIGPU1:+$MULTIGPU1, }${FIRST1:+$FIRST1, }decode rows on GPU 1; then $QUEUE on both"
[ -f "$K/queue" ] || tr ' ' '\n' <<< "$QUEUE" | grep . > "$K/queue"  # a restarted pipeline resumes the queue
{ recovery 0 29512 "$FIRST0"; mla_export 0; worker 0 29512; } &
{ multigpu 1 "$MULTIGPU1"; recovery 1 29513 "$FIRST1"; decode 1; loss_rows 1; worker 1 29513; max_batch 1; } &
wait
if [ -n "$MULTIGPU1$MULTIGPU2" ]; then  # again, with the 1-GPU runs
  python3 $R/multigpu-h200/compare.py "$K/multigpu" > "$K/multigpu/compare.txt" 2>&1
fi
stamp "C: sampler on GPU 1"
sampler
stamp "ALL DONE"
