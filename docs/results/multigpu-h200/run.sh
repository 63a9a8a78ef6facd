#!/bin/bash
# Issue 14 on a machine of 2 H200s (nvidia-h200-x2), through the product's own command. After
# `setup.sh part00` and `setup.sh assemble` of docs/results/recovery-h200/ (the model, fortunes, wheels), from the
# repo root, in the background:
#   setsid nohup bash docs/results/multigpu-h200/run.sh > ~/kvgpu/multigpu.log 2>&1 < /dev/null &
# then `python3 docs/results/multigpu-h200/compare.py ~/kvgpu/multigpu` prints the tables. Every run: the
# lowrank-25 recipe, 60 steps at one global batch of 32 x 2048 tokens, distillation, eager (compiling costs each
# short run a minute or more); the teacher samples (the recipes' 8M tokens, so the recovery runs of the same
# session reuse them) drawn once and shared through the cache. A finished run is skipped on a rerun.
# ONLY="z3-1gpu z3-2gpu ...": only the runs named (a later session's remaining ones). ONE_GPU: see run().
# PHASE=1 runs only the 1-GPU runs (on GPU 0, so a recovery pipeline can use GPU 1 meanwhile), PHASE=2 only the
# 2-GPU ones. The 2-GPU runs dump their in-memory logits of two held-out rows (KVFORGE_DUMP_LOGITS) for
# compare.py to check the consolidated export against.
# Smoke-tested on the 2-core CPU with DS=.venv/bin/deepspeed PYTHONPATH= and EXTRA shrinking the model to 2 layers
# of 64 (every run finished; the resumed run repeated steps 31-60 exactly; compare.py printed its tables).
set -u
K=${K:-$HOME/kvgpu}
OUTD=$K/multigpu
mkdir -p "$OUTD"
export KVFORGE_CACHE=$K/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 PYTHONPATH=${PYTHONPATH:-/tmp/site:/tmp/kv} TORCH_CUDA_ARCH_LIST=9.0
DS=${DS:-/tmp/site/bin/deepspeed}
COMMON=(--config configs/recovery/lowrank-25.yaml "model.name=$K/SmolLM2-135M-Instruct.Q4_1.gguf"
        "eval.heldout=[$K/fortunes]" training.max_steps=60 training.eval_every=30 training.warmup_steps=10
        training.compile=false checkpoint.save_every=30 checkpoint.keep_last=2)
read -r -a EXTRA <<< "${EXTRA:-}"  # appended to every run (a CPU smoke test shrinks the model and batch with it)

run() {  # name gpus [overrides]
  local name=$1 gpus=$2; shift 2
  [ -f "$OUTD/$name/metrics.jsonl.done" ] && return 0
  case "${PHASE:-all}" in 1) [ "$gpus" = 1 ] || return 0 ;; 2) [ "$gpus" = 2 ] || return 0 ;; esac
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  echo "$(date +%T) $name on $gpus GPU(s)"
  local dump=""; [ "$gpus" = 2 ] && dump="$OUTD/$name.logits.pt"
  # ONE_GPU=N: a 1-GPU run on GPU N with its own port, so it can share the host with another pipeline.
  local where=(--num_gpus "$gpus")
  [ "$gpus" = 1 ] && [ -n "${ONE_GPU:-}" ] && where=(--include "localhost:$ONE_GPU" --master_port $((29600 + ONE_GPU)))
  KVFORGE_DUMP_LOGITS=$dump "$DS" "${where[@]}" launch/train.py "${COMMON[@]}" "run.output_dir=$OUTD/$name" "$@" "${EXTRA[@]}" \
    > "$OUTD/$name.log" 2>&1 && touch "$OUTD/$name/metrics.jsonl.done" \
    || { echo "$name FAILED"; tail -15 "$OUTD/$name.log"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUTD/env.txt" 2>/dev/null
# 1. The same global batch (32 rows) on 1 and 2 GPUs, ZeRO-2 and ZeRO-3.
run z2-1gpu 1 deepspeed.zero_stage=2 training.grad_accum=2
run z2-2gpu 2 deepspeed.zero_stage=2 training.grad_accum=1
run z3-1gpu 1 deepspeed.zero_stage=3 training.grad_accum=2
run z3-2gpu 2 deepspeed.zero_stage=3 training.grad_accum=1
# The same two with the candidate stage-3 setting of zero3-cpu.md: params of <= 1e6 elements stay whole on every
# rank (DeepSpeed's default: 1e5), so of SmolLM2 only the embedding is partitioned and fetched; passed explicitly, so
# they measure it whatever kvforge's default becomes (steps_per_print as in the built-in config, which an inline
# deepspeed.config replaces).
Z3TUNED=(deepspeed.config.zero_optimization.stage3_param_persistence_threshold=1000000
         deepspeed.config.steps_per_print=1000000000)
run z3-1gpu-tuned 1 deepspeed.zero_stage=3 training.grad_accum=2 "${Z3TUNED[@]}"
run z3-2gpu-tuned 2 deepspeed.zero_stage=3 training.grad_accum=1 "${Z3TUNED[@]}"
# 2. Resumed on 2 GPUs from the ZeRO-3 run's step-30 checkpoint: steps 31-60 must repeat its losses.
run z3-2gpu-resumed 2 deepspeed.zero_stage=3 training.grad_accum=1 \
  "checkpoint.resume=$OUTD/z3-2gpu/checkpoints/step_00000030"
# 3. A Llama-3.2-1B-shaped model (random weights, SmolLM2's tokenizer and vocabulary), compressed the same way,
# 10 steps on the standard library's docstrings: ZeRO-3 memory per GPU on 1 and 2 GPUs (its random teacher makes
# the quality meaningless; memory and speed are what it measures).
BIG=(model.init=random model.config.hidden_size=2048 model.config.intermediate_size=8192
     model.config.num_hidden_layers=16 model.config.num_attention_heads=32 model.config.num_key_value_heads=8
     model.config.head_dim=64 model.config.tie_word_embeddings=true training.max_steps=10 training.eval_every=10
     training.warmup_steps=2 "data.mix=[]" data.source=stdlib-docstrings checkpoint.save_every=0 "eval.heldout=[]")
run big-z3-1gpu 1 deepspeed.zero_stage=3 training.grad_accum=2 "${BIG[@]}"
run big-z3-2gpu 2 deepspeed.zero_stage=3 training.grad_accum=1 "${BIG[@]}"
echo "$(date +%T) multi-GPU runs done"
