#!/bin/bash
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false KVFORGE_CACHE=/tmp/sweep/cache
common="--eval-source /work/main/.gpu/fortunes --eval-seq-len 2048 --eval-rows 14 --eval-batch-size 4 --calib-tokens 16384 --calib-seq-len 2048 --calib-source stdlib-docstrings"
run() { name=$1; shift; [ -f /tmp/sweep/$name.json ] && return; echo "$(date +%T) $name"; python launch/compress.py $common "$@" --json /tmp/sweep/$name.json > /tmp/sweep/$name.log 2>&1 || echo "FAILED $name"; }
run partial25-aware --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=16
run partial25-r8-aware --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=8
run partial25-r8-pca --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=8 --surgery init=pca
run partial50-aware --spec low-rank --budget 0.5 --arg rope=partial --arg rope_dims=16
run partial50-pca --spec low-rank --budget 0.5 --arg rope=partial --arg rope_dims=16 --surgery init=pca
run pre50-doc --spec low-rank --budget 0.5
echo "$(date +%T) done"
# Session 22: the cache in 8 bits (twice the elements in the same bytes, less the scales'), rotary dims per head swept
run partial25-int8-r16 --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=16 --arg cache_bits=8
run partial25-int8-r32 --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=32 --arg cache_bits=8
run partial25-int8-r48 --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=48 --arg cache_bits=8
run pre25-int8 --spec low-rank --budget 0.25 --arg cache_bits=8
run partial25-int8-r24 --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=24 --arg cache_bits=8
run partial25-int8-r40 --spec low-rank --budget 0.25 --arg rope=partial --arg rope_dims=40 --arg cache_bits=8
