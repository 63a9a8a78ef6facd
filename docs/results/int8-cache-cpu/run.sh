#!/bin/bash
# After-surgery perplexity of pre-RoPE latents cached in the model's dtype and in 8 bits, through the product's own
# command, on this 2-core CPU (fp32 model; bytes measured from a bf16 generate()). From the repo root:
#   bash docs/results/int8-cache-cpu/run.sh > docs/results/int8-cache-cpu/log.txt 2>&1
C="--spec low-rank --calib-source stdlib-docstrings --calib-tokens 16384 --calib-seq-len 2048 --eval-source .gpu/fortunes --eval-seq-len 2048 --eval-rows 8"
for row in "0.25 8" "0.25 none" "0.125 8" "0.5 8" "0.5 none" "0.125 none"; do
  set -- $row
  arg=""; [ "$2" = 8 ] && arg="--arg cache_bits=8"
  echo "== budget $1 bits $2"; date
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C --budget $1 $arg \
    --json docs/results/int8-cache-cpu/b$1-$2.json 2>&1 | grep -v Warning | tail -12
done
# Windows (1,020 + 4 sinks) in every odd layer beside the latents, at an eighth of the cache at 2,048 tokens:
# configs/recovery/window-lowrank-12{,-int8-long}.yaml's compression (window-lowrank-12.json, window-lowrank-12-int8.json).
C2="--calib-source stdlib-docstrings --calib-tokens 16384 --calib-seq-len 2048 --eval-source .gpu/fortunes --eval-seq-len 2048 --eval-rows 8"
for recipe in window-lowrank-12-int8-long window-lowrank-12; do
  echo "== $recipe"; date
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KVFORGE_CORPUS=/etc/hostname .venv/bin/python launch/compress.py $C2 \
    --spec configs/recovery/$recipe.yaml --budget 0.125 --json docs/results/int8-cache-cpu/${recipe%-long}.json 2>&1 \
    | grep -v Warning | tail -4
done
# The original model with an 8-bit KV cache: no surgery, every layer's K and V in int8 (standard.json).
echo "== standard, cache_bits 8"; date
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C2 --spec standard --arg cache_bits=8 \
  --json docs/results/int8-cache-cpu/standard-int8.json 2>&1 | grep -v Warning | tail -4
# 4-bit latents (session 11), after surgery balances low-bit latents (b<budget>-<bits>-balanced.json; the
# b*-4-unbalanced.json rows ran the same loop on the commit before, 1fd5d04 plus the 4-bit cache):
for row in "0.125 4" "0.25 4" "0.125 8" "0.25 8"; do
  set -- $row
  echo "== budget $1 bits $2 balanced"; date
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C --budget $1 --arg cache_bits=$2 \
    --json docs/results/int8-cache-cpu/b$1-$2-balanced.json 2>&1 | grep -v Warning | tail -3
done
echo "== standard, cache_bits 4"; date
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C2 --spec standard --arg cache_bits=4 \
  --json docs/results/int8-cache-cpu/standard-int4.json 2>&1 | grep -v Warning | tail -3
