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
