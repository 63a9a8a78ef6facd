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
from shared_memory import held_open  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (converted once, then cached)."""
    from kvforge.models.loading import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For modules of tiny models: their matmuls gain nothing from threads, and on a shared 2-core machine
    the threads fight other processes (use with `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_MEMORY = "/dev/shm"
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer_"


@pytest.fixture(autouse=True)
def remove_deepspeed_shared_memory_buffers():
    """DeepSpeed's CPU all-reduce maps a 66 MB buffer per rank in /dev/shm and never unlinks it; the trainer's
    ranks unlink theirs at exit (trainer/runtime.py), but ranks the fault tests kill cannot, nor can the tests'
    own in-process engines. Before both, a full run of this suite left 226 of them, 15 GB of RAM, and later tests
    ran out of memory. Each test removes the buffers that appeared while it ran and that no live process holds
    (its own ranks have exited by then; another process's may still be running)."""

    def buffers() -> set[str]:
        try:
            return {n for n in os.listdir(SHARED_MEMORY) if n.startswith(DEEPSPEED_SHM_PREFIX)}
        except OSError:
            return set()

    before = buffers()
    yield
    appeared = buffers() - before
    if not appeared:
        return
    for name in appeared - held_open(SHARED_MEMORY):
        try:
            os.unlink(os.path.join(SHARED_MEMORY, name))
        except OSError:
            pass
