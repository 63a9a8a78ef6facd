"""Test-wide settings: never touch the network, keep W&B offline, keep CPU threads predictable."""

import os

# Set before transformers/datasets/wandb are imported anywhere: a hub call here only fails after ~25 s
# of retries, and tests must never download weights or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels are tested on CPU through Triton's interpreter, which must be on before triton is imported.
# Nothing runs them on CPU unless a test asks for it (KVFORGE_KERNELS=triton): the default dispatch is
# Triton on CUDA tensors only.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (converted once, then cached)."""
    from kvforge.models.loading import embedded_model_dir

    return embedded_model_dir()
