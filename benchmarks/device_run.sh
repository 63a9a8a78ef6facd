# Runs a launch/ script on the device machine (no install: kvforge's folders linked as a package; .whl's wheels
# installed into /tmp/site when the call carries it):
#   bash benchmarks/device_run.sh launch/benchmark_decode.py --json $OUT/decode.json
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/kv/kvforge
for d in trainer models kernels; do ln -sfn "$PWD/$d" /tmp/kv/kvforge/$d; done
cp kvforge/*.py /tmp/kv/kvforge/
export PYTHONPATH=/tmp/kv
if [ -d .whl ]; then  # carried (carry [.whl]): kvforge's dependencies the image lacks (omegaconf for the recipes)
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/kv:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
${WRAP:-} python3 "$@"  # WRAP: a profiler before python3 (benchmarks/ncu_latent.py)
