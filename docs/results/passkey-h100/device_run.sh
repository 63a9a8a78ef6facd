# Passkey table on the device: SmolLM2-135M-Instruct (the embedded GGUF, carried in two parts) in bf16.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 KVFORGE_CACHE=/tmp/kvcache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/gguf-0.19.0-py3-none-any.whl || exit 1
mkdir -p /tmp/kv/kvforge
for d in trainer models kernels; do ln -sfn "$PWD/$d" /tmp/kv/kvforge/$d; done
cp kvforge/*.py /tmp/kv/kvforge/
export PYTHONPATH=/tmp/kv:/tmp/site; mkdir -p /tmp/pkout
[ -f /tmp/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/gguf.part1 .devcarry/gguf.part2 > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
(cd /tmp && python3 $OLDPWD/.devcarry/preconvert.py /tmp/SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tail -1)
sha256sum /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name --format=csv,noheader
(cd /tmp && python3 -c "import torch, transformers, gguf, kvforge.models.pyramid, kvforge.trainer.data; print(torch.__version__, transformers.__version__)") || exit 1
E="python3 launch/evaluate.py --task passkey --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --dtype bfloat16 --samples ${SAMPLES:-10} --passkey-seed 1"
run() { name=$1; shift; $E "$@" --json /tmp/pkout/$name.json > /tmp/pkout/$name.log 2>&1 || { echo "FAILED $name"; tail -5 /tmp/pkout/$name.log; }; grep -E "^passkey accuracy" /tmp/pkout/$name.log; }
run full_2k --context-len 2048
run full_4k --context-len 4096
for b in 512 256 128 64 32; do for s in pyramid uniform; do
  run ${s}_${b}_4k --context-len 4096 --pyramid-budget $b --pyramid-schedule $s
done; done
run chat_2k --context-len 2048 --passkey-format chat --samples 4
tar czf $OUT/passkey_gpu.tgz -C /tmp pkout
