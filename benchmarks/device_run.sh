# Runs a launch/ script on the device machine (no install: kvforge's folders linked as a package):
#   bash benchmarks/device_run.sh launch/benchmark_decode.py --json $OUT/decode.json
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/kv/kvforge
for d in trainer models kernels; do ln -sfn "$PWD/$d" /tmp/kv/kvforge/$d; done
cp kvforge/*.py /tmp/kv/kvforge/
export PYTHONPATH=/tmp/kv
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
${WRAP:-} python3 "$@"  # WRAP: a profiler before python3 (benchmarks/ncu_latent.py)
