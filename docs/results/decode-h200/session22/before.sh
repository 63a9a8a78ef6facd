#!/bin/bash
# Session 22's decode rows, run by recovery-h200/run.sh as its BEFORE command (alone on the GPU, before the recipe):
# the two launch settings built after session 21's GPU time and never timed. Random weights; CUDA-graph replay.
#   fused_values: the splits' merge and U_v in one kernel (both latent kernels);
#   whole_waves for the pre-RoPE 8-bit kernel (two programs per SM hold), at 8 (the default) and 2 per SM.
# Results: $RES/fused-partial.json, $RES/fused-latent.json (each JSON records its command).
set -u
export PYTHONUNBUFFERED=1
python3 launch/benchmark_decode.py --part partial --batch 64 128 --context 4096 16384 --fused-values 0 1 \
  --json "$RES/fused-partial.json" > "$RES/fused-partial.log" 2>&1 || tail -5 "$RES/fused-partial.log"
python3 launch/benchmark_decode.py --part latent --batch 32 64 128 --context 4096 16384 --k-rank 48 --v-rank 144 \
  --cache-bits 8 --programs-per-sm 0 2 --whole-waves 0 1 --fused-values 0 1 \
  --json "$RES/fused-latent.json" > "$RES/fused-latent.log" 2>&1 || tail -5 "$RES/fused-latent.log"
