#!/bin/bash
# GPU benchmark of issue 11 (run from the repo root on the device machine)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/kv TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled KVFORGE_CACHE=/tmp/kvcache
mkdir -p /tmp/kv/kvforge /tmp/res
for d in trainer models kernels; do ln -sfn "$PWD/$d" /tmp/kv/kvforge/$d; done
cp kvforge/*.py /tmp/kv/kvforge/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch, triton, transformers, deepspeed; print(torch.__version__, triton.__version__, transformers.__version__, deepspeed.__version__)" 2>&1 | tail -1 | tee -a $OUT/env.txt
M=$PWD/.bench/smollm2
DS=/tmp/site/bin/deepspeed
python3 launch/benchmark_train.py --out /tmp/res/after --model $M --launcher $DS --steps ${STEPS:-20} --warmup ${WARMUP:-5} --profile-step ${PROFILE:-20} ${RECIPES:+--recipes $RECIPES} 2>&1 | tee $OUT/after.txt
tar czf $OUT/after.tgz -C /tmp/res after
if [ -n "${BEFORE:-}" ]; then
  cp .bench/modeling_before.py models/modeling_kvforge.py
  python3 launch/benchmark_train.py --out /tmp/res/before --model $M --launcher $DS --steps 12 --warmup 4 --tag before --recipes $BEFORE 2>&1 | tee $OUT/before.txt
  tar czf $OUT/before.tgz -C /tmp/res before
fi
