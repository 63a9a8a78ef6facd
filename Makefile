# Two commands on a fresh machine:
#   make main   set up, then compress -> finetune -> export -> reload -> generate on the real SmolLM2
#   make test   set up, then run the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvforge-installed
# CPU ranks for the deepspeed launcher on a machine without GPUs.
RANKS ?= 2

.PHONY: setup docs main test clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: the CPU wheel lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

# Real text for the main job: Debian's Python docs sources (installed when we may; else use
# data.source=stdlib-docstrings, which every machine has).
docs:
	@if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null; fi

setup: $(STAMP) docs

# compress -> finetune (2 DeepSpeed ranks, distilled from the original) -> export -> reload in a fresh
# process with plain transformers -> generate, printing the cache generate() really allocated.
RUN := runs/smollm2-recover
main: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/deepspeed --num_gpus $(RANKS) launch/train.py \
		--config configs/smollm2-recover.yaml run.output_dir=$(RUN)
	HF_HUB_OFFLINE=1 $(PY) launch/export.py --run $(RUN) --out $(RUN)/export --overwrite
	HF_HUB_OFFLINE=1 $(PY) launch/generate.py --model $(RUN)/export --dtype bfloat16 --json $(RUN)/generate.json

# Offline always: tests never download weights or data.
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

clean:
	rm -rf runs $(VENV)
