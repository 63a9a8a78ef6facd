"""What a training process needs around the loop: its rank and device, the errors that are bad input, rank 0 doing
a step first, preemption by signals, and the faults tests inject.

Faults (README, "Reliability"): bad input fails with one of BAD_INPUT_ERRORS (the launcher prints it on one line,
exit code 2); SIGTERM/SIGINT checkpoint at the next step boundary (Preemption); tests inject faults through
$KVFORGE_FAULT, read once when training starts (Faults), never inside the loop.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..models.calibration import CalibrationError
from ..models.configuration_kvforge import CompressionSpecError
from ..models.loading import ModelLoadError
from ..models.modeling_kvforge import layers_compile_settings
from ..models.presets import PresetError
from ..models.surgery import SurgeryError
from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError

# Errors that mean "this input cannot work" (config, data, checkpoint, model, compression spec): the
# launcher reports them in one line without a traceback. Anything else is a bug and keeps its traceback.
BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, ModelLoadError, CompressionSpecError,
                    SurgeryError, PresetError, CalibrationError)
# Set by tests only: the faults to inject (see Faults).
FAULT_ENV = "KVFORGE_FAULT"


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device from the environment; a lone process becomes a world of one."""
    import deepspeed

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, default)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # Each CPU rank would otherwise start one thread per core, and the ranks fight over them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        # DeepSpeed's CPU all-reduce maps a 66 MB buffer per rank in /dev/shm (RAM) and never unlinks it, so every
        # CPU run left one per rank. Every peer mapped it when the process group started: unlinking it at exit
        # disturbs no one. Its name, from DeepSpeed's shm.cpp: <name>_<uid>_<addr>_<port>_<rank>.
        buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                                     f"{os.environ['MASTER_PORT']}_{rank}")
        atexit.register(buffer.unlink, missing_ok=True)
    return rank, world, device


def shutdown_distributed() -> None:
    """Destroys this process's group, if it has one: for a process about to exit (launch/train.py), so that the
    group's native threads stop before the interpreter's teardown rather than during it."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and returns.

    The ranks agree through an all-reduce, so every rank saves at the same step even when the
    signal reached only one of them (schedulers signal the whole job; a user may signal one pid).
    The handlers stay installed until `restore`, so the second SIGTERM the deepspeed launcher sends
    its children after a job-wide one does not kill a rank halfway through its checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # Only set flags here: printing from a signal handler can re-enter a print in progress.
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def wait(self, device: torch.device, timeout_s: float) -> None:
        """Block until a signal has reached any rank (collective: every rank must call it)."""
        deadline = time.monotonic() + timeout_s
        while not self.agreed(device):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no SIGTERM/SIGINT arrived within {timeout_s:.0f} s")
            time.sleep(0.05)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Faults:
    """Faults injected by tests through $KVFORGE_FAULT, read once when training starts.

    A comma-separated list of `kind:steps[@rank]`: steps are 1-based like the logged `step` and given
    as `S`, `S-E` (inclusive) or `S-` (from S on); without `@rank` the fault hits every rank. Kinds:

        sigterm        the rank sends itself SIGTERM in the middle of the step (after its first backward)
        stall          every rank waits at the start of the step until a signal reaches one of them
                       (at most 300 s), so a test can signal the processes at a known step
        nan_loss       the rank's first micro batch of the step has a NaN loss
        crash_in_save  the rank SIGKILLs itself inside checkpoint.save of the step, after the files are
                       written and before the manifest

    Example: KVFORGE_FAULT="nan_loss:2@1,stall:3". Real runs never set it. A malformed entry is an
    error, so a typo cannot make a fault test pass without injecting anything.
    """

    KINDS = ("sigterm", "stall", "nan_loss", "crash_in_save")

    def __init__(self, spec: str = ""):
        self.entries: list[tuple[str, int, Optional[int], Optional[int]]] = []  # kind, first, last, rank
        for item in filter(None, (part.strip() for part in spec.split(","))):
            try:
                kind, _, where = item.partition(":")
                steps, _, rank = where.partition("@")
                first, dash, last = steps.partition("-")
                entry = (kind, int(first), (int(last) if last else None) if dash else int(first),
                         int(rank) if rank else None)
            except ValueError:
                entry = None
            if entry is None or kind not in self.KINDS or entry[1] < 1:
                raise ValueError(f"{FAULT_ENV} entry {item!r} is not kind:steps[@rank] with kind in "
                                 f"{', '.join(self.KINDS)} and steps S, S-E or S- (S >= 1)")
            if kind == "stall" and entry[3] is not None:
                raise ValueError(f"{FAULT_ENV} entry {item!r}: stall is collective and takes no @rank")
            self.entries.append(entry)

    @classmethod
    def from_env(cls) -> "Faults":
        return cls(os.environ.get(FAULT_ENV, ""))

    def fires(self, kind: str, step: int, rank: int) -> bool:
        return any(k == kind and first <= step and (last is None or step <= last) and r in (None, rank)
                   for k, first, last, r in self.entries)



def on_rank0_first(rank: int, fn, *, others=None):
    """Run `fn` on rank 0 while the other ranks wait, then `others` (if given) on them; returns the result.

    An exception on rank 0 is raised on every rank -- the same type for BAD_INPUT_ERRORS, so each rank
    reports it in one line -- instead of leaving the others in a barrier until a timeout.
    """
    result, failure = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on rank 0 as itself
            failure = e
    shared = [None if failure is None else (type(failure).__name__, str(failure))]
    dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    if shared[0] is not None:
        name, message = shared[0]
        cls = next((c for c in BAD_INPUT_ERRORS if c.__name__ == name), None)
        raise cls(message) if cls else RuntimeError(f"rank 0 failed ({name}): {message}")
    if rank != 0 and others is not None:
        result = others()
    return result


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM, wrapped or not (PEFT, DeepSpeed): the children of its `layers`
    ModuleList (`model.layers` in Llama, Mistral, Qwen2 and kvforge's models)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, torch.nn.ModuleList) and len(module):
            return list(module)
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList to compile one layer at a time: "
                     "use training.compile_scope=model")


def compile_in_place(model: torch.nn.Module, scope: str, engine: Any = None, **options) -> None:
    """torch.compile of a model in place, so parameter names and checkpoints stay as they are.

    scope "model": the whole forward (through `engine.compile()` when a DeepSpeed engine wraps the model).
    scope "layers": each decoder layer. The layers run one code object, so dynamo compiles it for the first layer
    and the next ones reuse the graph while their guards hold; a layer of another kind (window, latent rank, KV
    reader) adds a graph (a stock 30-layer Llama: 1 graph). Latent ranks, which greedy allocation makes different in
    nearly every layer, do not: the dimensions that differ between layers are dynamic from the first trace
    (layers_compile_settings), so all ranks share one symbolic graph (with static parameter shapes, lowrank-50's
    30 ranks compiled ~170 s before its first steps on the H200, session 9). The graphs may still number more than
    dynamo's default recompile limit (8), past which it would run the remaining layers eagerly without saying so,
    so the limit is raised to cover one graph per layer and mode (train, eval). `options` go to torch.compile
    (tests: backend="eager").
    """
    if scope == "model":
        (engine if engine is not None else model).compile(**options)
        return
    layers = decoder_layers(model)
    import torch._dynamo.config as dynamo_config

    # Process-wide: dynamo reads them when it first traces, after this returns.
    for name, value in layers_compile_settings(layers).items():
        setattr(dynamo_config, name, value)
    for layer in layers:
        layer.compile(**options)


def compile_summary() -> str:
    """What torch.compile has cost this process so far: graphs and seconds per phase, from dynamo's own counters
    (private, so read defensively). The first step's time says how long compiling took; this says where it went
    (tracing, AOT autograd, inductor's codegen, waiting on Triton's compile workers) and how many graphs."""
    try:
        from torch._dynamo.utils import calculate_time_spent, counters
        graphs = counters["stats"]["unique_graphs"]
        seconds = calculate_time_spent()
    except (ImportError, AttributeError, KeyError) as err:  # a torch that renamed them
        return f"unavailable ({type(err).__name__}: {err})"
    phases = ["entire_frame_compile", "entire_backward_compile", "backend_compile", "inductor_compile", "code_gen",
              "async_compile.wait"]
    parts = ", ".join(f"{name} {seconds[name]:.1f}s" for name in phases if name in seconds)
    return f"{graphs} graph(s); {parts}"
