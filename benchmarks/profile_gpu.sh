#!/bin/bash
# Issue 10/11 measurements on the device machine after `docs/results/recovery-h200/setup.sh assemble`: where the
# teacher sampler's decode step goes, and the trainer's step with and without torch.compile. Results to $OUT.
#   bash docs/results/recovery-h200/setup.sh assemble && bash benchmarks/profile_gpu.sh
set -u
K=$HOME/kvgpu
GGUF=$K/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:/tmp/kv TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled KVFORGE_CACHE=$K/cache
cd "$K/repo" || exit 1
R=/tmp/res && mkdir -p $R
for step in ${STEPS:-sampler eager compiled}; do
  case $step in
  sampler) timeout 240 python3 benchmarks/profile_sampler.py --model "$GGUF" ${SAMPLER_ARGS:-} > $R/sampler.txt 2>&1; tail -45 $R/sampler.txt ;;
  eager|compiled|fused*)
    set_args=(); [ $step = compiled ] && set_args=(--set training.compile=true)
    timeout 300 python3 launch/benchmark_train.py --out $R/$step --model "$GGUF" --launcher /tmp/site/bin/deepspeed \
      --steps ${TRAIN_STEPS:-16} --warmup 5 --profile-step ${TRAIN_STEPS:-16} --recipes ${TRAIN_RECIPES:-low-rank-pre-rope-25} \
      "${set_args[@]}" ${TRAIN_SET:+--set $TRAIN_SET} 2>&1 | tail -8 ;;
  esac
done
tar czf $OUT/profile.tgz -C $R .
