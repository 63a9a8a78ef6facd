#!/bin/bash
# After-surgery perplexity with greedy latent ranks in multiples of surgery.rank_multiple (auto: 16-byte cache rows,
# 8 in bf16, 16 in int8, 32 in 4 bits) against multiples of 1 (the allocation before), through the product's own
# command on this 2-core CPU, at docs/results/int8-cache-cpu's settings. From the repo root:
#   bash docs/results/rank-alignment-cpu/run.sh > docs/results/rank-alignment-cpu/log.txt 2>&1
# launch/compress.py reads files by suffix, and .gpu/fortunes holds Debian's suffixless files: each is staged as a
# <name>.txt link (as trainer/evaluation.plain_text_source stages them; the original's 22.441 says the same rows).
F=${F:-/tmp/fortunes-txt}
mkdir -p $F && for f in .gpu/fortunes/*; do ln -sf "$(realpath $f)" "$F/$(basename $f).txt"; done
C="--spec low-rank --calib-source stdlib-docstrings --calib-tokens 16384 --calib-seq-len 2048 --eval-source $F --eval-seq-len 2048 --eval-rows 8"
D=docs/results/rank-alignment-cpu
# budget, cache_bits (none: the model's dtype), rank_multiple. Parts: `run.sh` (log.txt), `run.sh extra`
# (log-extra.txt: the other budget of each bit width), `run.sh others` (log-others.txt: the other greedy recipes).
PART=${1:-main}
ROWS="0.25 8 auto|0.125 4 auto|0.125 4 16|0.5 none auto|0.25 8 1|0.125 4 1|0.5 none 1"
[ $PART = extra ] && ROWS="0.125 8 auto|0.125 8 1|0.25 4 auto|0.25 4 1"
[ $PART = others ] && ROWS=""
IFS='|' read -ra ROWS <<< "$ROWS"
for row in "${ROWS[@]}"; do
  set -- $row
  arg=""; [ "$2" != none ] && arg="--arg cache_bits=$2"
  echo "== budget $1 bits $2 rank_multiple $3"; date
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C --budget $1 $arg \
    --surgery rank_multiple=$3 --json $D/b$1-$2-m$3.json 2>&1 | grep -v Warning | tail -4
done
date
[ $PART = others ] || exit 0
# The other greedy recipes: partial RoPE (a joint latent of 336 columns beside 16 rotary dims per KV head) and
# configs/recovery's windows beside latents, bf16 and int8 (their base recipes read KVFORGE_CORPUS: any file will do).
for m in auto 1; do
  echo "== partial rope 16, budget 0.25, rank_multiple $m"; date
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python launch/compress.py $C --budget 0.25 --arg rope=partial \
    --arg rope_dims=16 --surgery rank_multiple=$m --json $D/partial16-b0.25-m$m.json 2>&1 | grep -v Warning | tail -3
  for recipe in window-lowrank-12 window-lowrank-12-int8-long; do
    echo "== $recipe, rank_multiple $m"; date
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KVFORGE_CORPUS=/etc/hostname .venv/bin/python launch/compress.py \
      ${C/--spec low-rank/--spec configs/recovery/$recipe.yaml} --budget 0.125 --surgery rank_multiple=$m \
      --json $D/${recipe%-long}-m$m.json 2>&1 | grep -v Warning | tail -3
  done
done
date
