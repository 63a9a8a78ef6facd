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


@pytest.fixture(autouse=True)
def restore_torch_linear():
    """DeepSpeed's ZeRO-3 (deepspeed.initialize with stage 3, or zero.Init: the trainer's runs in this process
    through the `launcher` fixture, e.g. test_reliability's deepspeed.zero_stage=3 runs) replaces
    torch.nn.functional.linear with its own zero3_linear_wrap and never puts it back ("This will persist unless
    manually reset", deepspeed/runtime/zero/partition_parameters.py). Every nn.Linear in this process then runs
    through that autograd Function: a biased one on a 3-D input becomes mm + add_ instead of torch's own fused
    addmm, and test_decode_step_ops counted one more kernel per layer than its bound, but only when a ZeRO-3 test
    file had run earlier in the same process (under pytest-xdist, whichever file shared its worker). The trainer's
    own processes exit after training, so only tests ever meet the leak: each test gives torch's own linear back
    when it ends. Restored to torch._C._nn.linear (what torch.nn.functional.linear is), not to a snapshot: a
    module-scoped fixture that ran ZeRO-3 is set up before any function fixture could take one."""
    yield
    import torch

    if torch.nn.functional.linear is not torch._C._nn.linear:
        torch.nn.functional.linear = torch._C._nn.linear


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
