#!/bin/bash
# Issue 10's recovery runs on one H200, through the product's own commands. From the repo root on the device
# machine, after setup.sh, in the background so no stage dies at a call boundary:
#   setsid nohup bash docs/results/recovery-h200/run.sh > ~/kvgpu/pipeline.log 2>&1 < /dev/null &
# Every finished stage leaves its result in $RES; a rerun skips it. Env: K (work folder), RECIPES, DS, NGPU, LAUNCH,
# EXTRA / CEXTRA (overrides for every run / for compressed runs: the CPU dry run shrinks the job with them),
# SUITE_ARGS (launch/evaluate.py --task suite options), NO_SUITE (runs scored only by their own held-out evals),
# BEFORE (a command run first, alone on the GPU, its output in $RES/before.log: e.g. a decode benchmark, so a
# session's GPU work is one background pipeline with no idle gap between calls).
# A run that fails with training.compile=true is run again eager (its compiled log kept as .compiled.log), so a
# compiler failure costs its minutes but not the result.
set -u
K=${K:-$HOME/kvgpu}
export RES=$K/results  # exported: a BEFORE command may write there
mkdir -p "$RES"
export KVFORGE_CACHE=$K/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE=${WANDB_MODE:-disabled}  # the device image has no wandb
GGUF=$K/SmolLM2-135M-Instruct.Q4_1.gguf
PROSE=$K/fortunes
DS=${DS:-/tmp/site/bin/deepspeed}
NGPU=${NGPU:-1}
# LAUNCH: the deepspeed launcher's options. Two pipelines on one 2-GPU host: CUDA_VISIBLE_DEVICES=1 and
# LAUNCH="--master_port 29511" (the launcher takes CUDA_VISIBLE_DEVICES only when --num_gpus is not given).
read -r -a LAUNCH <<< "${LAUNCH:---num_gpus $NGPU}"
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a CEXTRA <<< "${CEXTRA:-}"
read -r -a SUITE <<< "${SUITE_ARGS:---eval-fraction 0.1 --seq-len 2048 --batch-size 8 --max-batches 8 --context-lens 2048 4096 8192 --depths 0,0.25,0.5,0.75,1 --samples 4}"

stamp() { echo "$(date +%T) $*"; }

suite() {  # name model [options]
  local name=$1 model=$2; shift 2
  [ -f "$RES/$name.json" ] && return 0
  stamp "suite $name"
  python3 launch/evaluate.py --task suite --model "$model" --label "$name" --data "$PROSE" "${SUITE[@]}" "$@" \
    --json "$RES/$name.json" > "$RES/$name.suite.log" 2>&1 || { stamp "suite $name FAILED"; tail -5 "$RES/$name.suite.log"; }
}

train() {  # name [overrides]
  local name=$1 start; shift
  [ -f "$RES/$name.train.seconds" ] && return 0
  stamp "train $name"
  start=$(date +%s)
  if "$DS" "${LAUNCH[@]}" launch/train.py --config "configs/recovery/$name.yaml" "run.output_dir=$K/runs/$name" \
      "model.name=$GGUF" "eval.heldout=[$PROSE]" "${EXTRA[@]}" "$@" > "$RES/$name.train.log" 2>&1; then
    echo $(( $(date +%s) - start )) > "$RES/$name.train.seconds"
    cp "$K/runs/$name/metrics.jsonl" "$RES/$name.metrics.jsonl"
    cp "$K/runs/$name/config.yaml" "$RES/$name.config.yaml"
  elif [[ " $* " != *" training.compile=false "* ]] && { [[ " ${EXTRA[*]} $* " == *" training.compile=true "* ]] \
      || grep -q "^  compile: true" "$K/runs/$name/config.yaml" 2>/dev/null; }; then  # compiled by override or recipe
    stamp "train $name FAILED compiled: again eager"; tail -5 "$RES/$name.train.log"
    mv "$RES/$name.train.log" "$RES/$name.compiled.log"; rm -rf "$K/runs/$name"
    train "$name" "$@" training.compile=false
  else
    stamp "train $name FAILED"; tail -20 "$RES/$name.train.log"; return 1
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$RES/env.txt" 2>/dev/null
python3 -c "import torch, triton, transformers, deepspeed; print(torch.__version__, triton.__version__, transformers.__version__, deepspeed.__version__)" >> "$RES/env.txt" 2>&1
# The fused loss kernel checked against the PyTorch chunks at the step's real shape; on a mismatch every run
# below uses the PyTorch path (KVFORGE_KERNELS=off), and the log says so.
if ! python3 benchmarks/check_loss_gpu.py > "$RES/check_loss_gpu.txt" 2>&1; then
  stamp "fused loss check FAILED: KVFORGE_KERNELS=off"; export KVFORGE_KERNELS=off
fi
cat "$RES/check_loss_gpu.txt"
if [ -n "${BEFORE:-}" ] && [ ! -f "$RES/before.log" ]; then
  stamp "before: $BEFORE"; bash -c "$BEFORE" > "$RES/before.log.part" 2>&1; mv "$RES/before.log.part" "$RES/before.log"
fi
[ -n "${SKIP_ORIGINAL:-}" ] || suite original "$GGUF" --role original
for name in ${RECIPES:-lowrank-25 lowrank-50 finetuned-original lowrank-12}; do
  if [[ "$name" == finetuned-original* ]]; then
    train "$name" && suite "$name" "$K/runs/$name/hf_model" --role finetuned-original
  else
    train "$name" "${CEXTRA[@]}" && [[ " ${NO_SUITE:-} " != *" $name "* ]] && suite "$name" "$K/runs/$name"
  fi
done
stamp "ALL DONE"
