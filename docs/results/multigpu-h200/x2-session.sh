#!/bin/bash
# One session on a 2-H200 host (nvidia-h200-x2) as one background pipeline, both GPUs busy throughout, the most
# needed runs first (whatever the device time leaves undone is what comes last). The order since session 11:
#   B: issue 14's 2-GPU runs (MULTIGPU2; none by default since issue 14 closed), then compare.py (tables; each
#      export against the trained model);
#   A: on GPU 0, QUEUE0: window layers beside 8-bit latents at 12.5% for 1,500 steps (issue 10's 12.5% target, the
#      one the 8-bit latents alone missed in session 10), the finetuned original on the corpus mix (the baseline the
#      corpus rows lack), then MixAttention. On GPU 1: a one-minute check of where partial-RoPE layers fail compiled
#      (benchmarks/check_partial_rope_compile.py), FIRST1 (partial-rope-25, which crashed compiled in session 9),
#      issue 12's decode rows (DECODE_ARGS: B=32 at 16k; window and MixAttention layouts at 4k and 32k), then QUEUE1:
#      the recipes still without a row (issues 10 and 11);
#   C: the teacher sampler's speed with each attention path (SAMPLER_ATTENTION: the Triton decode kernel was never
#      run on a GPU), on GPU 1.
# Session 7's order put the multi-GPU runs last and lost them; session 8's ran them first and finished them. Recipe
# runs are where a session's minutes go (6-13 min each), so they come after the few short runs that close things.
# Started by `PIPELINE=docs/results/multigpu-h200/x2-session.sh bash docs/results/recovery-h200/setup.sh start`
# (after `setup.sh part00` and `setup.sh stage`), so it runs from $K/repo and logs to $K/pipeline.log; poll.sh follows it (its "ALL
# DONE" is this script's last line; the sub-pipelines log to $K/pipeline-gpu*.log and $K/multigpu/).
# Env: FIRST0 (a recipe before QUEUE0, followed by its DeepSeek-V3 export when it is partial-rope-shared-25),
# QUEUE0, FIRST1 (before the decode rows), QUEUE1 (recipes), MULTIGPU1/2 (multigpu-h200/run.sh's runs), REXTRA (overrides for the recovery runs
# only), DECODE_ARGS (launch/benchmark_decode.py's; empty: no decode rows), SAMPLER_ATTENTION.
set -u
K=${K:-$HOME/kvgpu}
R=docs/results
FIRST0=${FIRST0:-}
QUEUE0=${QUEUE0:-window-lowrank-12-int8-long finetuned-original-corpus mixattention-ma}
FIRST1=${FIRST1:-partial-rope-25}
QUEUE1=${QUEUE1:-shared-attention window-lowrank-12 lowrank-25-prose}
MULTIGPU1=${MULTIGPU1:-}
MULTIGPU2=${MULTIGPU2:-}
SAMPLER_ATTENTION=${SAMPLER_ATTENTION-matmul triton}
# B=32 at 16k (the issue's second end-to-end point) and B=128 at 4k with the 25% model's 8-bit latents (the kernel
# reads int8 since session 10); then window and MixAttention layouts at 4k and 32k, whose window layers should
# decode in the same time at both.
DECODE_ARGS=${DECODE_ARGS-"--gen-batch 32 --gen-prompt 16384 --gen-variants original original-static lr50-static \
lr25-int8-static --repeats 5|--gen-batch 128 --gen-prompt 4096 --gen-variants original-static lr25-int8-static --repeats 3|--gen-batch 32 --gen-prompt 4096 --gen-variants window-static mixattention-static --repeats 3|\
--gen-batch 32 --gen-prompt 32768 --gen-variants window-static mixattention-static original-static --repeats 3"}
stamp() { echo "$(date +%T) $*"; }
mkdir -p "$K/results"

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

diagnose() {  # gpu: where partial-RoPE layers fail compiled (session 9's misaligned address), ~1 min
  [ -f "$K/results/partial-rope-compile.txt" ] && return 0
  stamp "partial-RoPE compile check on GPU $1"
  CUDA_VISIBLE_DEVICES=$1 CUDA_LAUNCH_BLOCKING=1 timeout 300 python3 benchmarks/check_partial_rope_compile.py \
    > "$K/results/partial-rope-compile.txt" 2>&1
  grep -a "^OK\|^FAIL" "$K/results/partial-rope-compile.txt"
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
stamp "A: ${FIRST0:+$FIRST0 (then its stock export), }$QUEUE0 on GPU 0; ${MULTIGPU1:+$MULTIGPU1, }$FIRST1, decode rows, $QUEUE1 on GPU 1"
{ recovery 0 29512 "$FIRST0"; mla_export 0; recovery 0 29512 "$QUEUE0"; } &
{ multigpu 1 "$MULTIGPU1"; diagnose 1; recovery 1 29513 "$FIRST1"; decode 1; recovery 1 29513 "$QUEUE1"; } &
wait
if [ -n "$MULTIGPU1$MULTIGPU2" ]; then  # again, with the 1-GPU runs
  python3 $R/multigpu-h200/compare.py "$K/multigpu" > "$K/multigpu/compare.txt" 2>&1
fi
stamp "C: sampler on GPU 1"
sampler
stamp "ALL DONE"
