"""Checkpoints that count only when complete, and are verified before they are resumed.

Layout under `<run_dir>/checkpoints/`:

    step_00000050/        complete: DeepSpeed engine files, rng_rank<r>.pt, trainer_state.json, MANIFEST.json
    .tmp-step_00000100/   being written, or abandoned by a crash: never loaded, removed on the next start
    .old-step_00000040/   being deleted (pruned, or replaced by a new save of its step): removed on the next start

Saving is collective (every rank calls `save`):
  1. every rank writes its engine shards and RNG state into `.tmp-step_N/`;
  2. the ranks describe the files between them: size, sha256, and the shape and dtype of every tensor
     in each .pt / .safetensors file. Rank 0 checks the content: no empty tensor (except the
     placeholders ZeRO-3 leaves in the module state; their data lives in the optimizer partitions),
     and every trainable parameter -- LoRA adapters included -- present with its full shape;
  3. rank 0 writes trainer_state.json, then MANIFEST.json, fsyncs, and renames the folder into place;
  4. every rank learns whether that worked: a failure on rank 0 raises on all ranks instead of
     leaving the others waiting in a barrier.
A crash at any point leaves the previous complete checkpoint and possibly the new one, never a
half-written folder under a final name.

Resuming: the newest complete checkpoint whose files match its manifest (sizes and sha256, checked by
the ranks in parallel) is used; a truncated or corrupted one is reported, naming the file, and the
previous one is used instead. Whether a checkpoint fits the run (world size, and the parts of the
config that decide the model and the data order) is checked before anything is built. DeepSpeed
saves neither RNG states nor the data position, so they travel here (the data position is the step;
see trainer/data.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import atomic

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 2         # 1: sizes and hashes only; 2: + tensor shapes, trainable parameters
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"        # being written
OLD_PREFIX = ".old-"        # being deleted
TENSOR_FILE_SUFFIXES = (".pt", ".safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the folder, the file and the fix."""


@dataclass
class TrainerState:
    step: int                   # optimizer steps completed; also the data position
    tokens_seen: int
    world_size: int
    wandb_run_id: Optional[str]
    config_fingerprint: str     # hash of `signature` (older checkpoints: of model/data/compression/batch)
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0      # steps skipped for a non-finite loss or gradient, over the whole run
    bad_steps_in_a_row: int = 0
    # What must not change across a resume (model, data, compression, batch layout, ...), by config
    # key; compared key by key so a mismatch names what changed. Empty in checkpoints from before it.
    signature: dict[str, Any] = field(default_factory=dict)
    data_digest: Optional[str] = None  # of the packed training rows: the batches a resume would read
    # The optimizer's parameter groups by name (stages.optimizer_layout), which ZeRO's saved state is laid out by.
    # Empty in checkpoints from before it.
    optimizer_groups: list[list[str]] = field(default_factory=list)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------------
# Ranks (every function also works in a single process without torch.distributed)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _world() -> int:
    return dist.get_world_size() if _initialized() else 1


def _barrier() -> None:
    if _initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------
# Files


def _flatten_tensors(obj: Any, prefix: str, out: dict[str, dict]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = {"shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten_tensors(value, f"{prefix}[{i}]", out)


def tensor_shapes(path: Path) -> dict[str, dict]:
    """{dotted key: {"shape": [...], "dtype": "..."}} of every tensor in a .pt or .safetensors file.

    .pt files are memory-mapped, so only the pickled structure is read, not the tensor data. They are
    unpickled with weights_only=False because DeepSpeed stores its own objects in them: only call
    this on files this run wrote.
    """
    out: dict[str, dict] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype()).lower()}
        return out
    _flatten_tensors(torch.load(path, map_location="cpu", weights_only=False, mmap=True), "", out)
    return out


def describe_file(path: Path) -> dict:
    """What the manifest records for one file: bytes, sha256, and tensor shapes for tensor files."""
    entry = {"bytes": path.stat().st_size, "sha256": atomic.sha256_file(path)}
    if path.suffix in TENSOR_FILE_SUFFIXES:
        entry["tensors"] = tensor_shapes(path)
    return entry


def trainable_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> full shape of every trainable parameter (ZeRO-3 keeps the full shape in `ds_shape`)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters() if p.requires_grad}


def check_contents(files: dict[str, dict], trainable: dict[str, list[int]], zero_stage: int) -> list[str]:
    """Problems with what a checkpoint holds (empty list: none).

    * No tensor may be empty, except the module-state placeholders of ZeRO-3 (its weights live in the
      optimizer's fp32 partitions). An empty adapter or weight saved by mistake is the classic way a
      checkpoint "succeeds" and holds nothing.
    * Every trainable parameter must be in the checkpoint with its full shape: in DeepSpeed's
      `param_shapes` (ZeRO 1-3, from which the fp32 partitions are reassembled) or as a tensor of the
      module state (no ZeRO).
    """
    problems = []
    for rel, entry in files.items():
        for key, meta in entry.get("tensors", {}).items():
            empty = 0 in meta["shape"]
            zero3_placeholder = zero_stage == 3 and "model_states" in rel and key.startswith("module.")
            if empty and not zero3_placeholder:
                problems.append(f"{rel}: tensor {key} is empty (shape {meta['shape']})")
    model_states = sorted(rel for rel in files if rel.endswith("model_states.pt"))
    if not model_states:
        return problems + ["no DeepSpeed model_states file"]
    saved: dict[str, list[int]] = {}
    state = torch.load(files[model_states[0]]["path"], map_location="cpu", weights_only=False, mmap=True)
    for group in state.get("param_shapes") or []:
        saved.update({name: list(shape) for name, shape in group.items()})
    for key, meta in files[model_states[0]].get("tensors", {}).items():
        if key.startswith("module.") and 0 not in meta["shape"]:
            saved.setdefault(key.removeprefix("module."), meta["shape"])
    for name, shape in trainable.items():
        if name not in saved:
            problems.append(f"trainable parameter {name} (shape {shape}) is not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"trainable parameter {name} is saved with shape {saved[name]}, expected {shape}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Saving


def save(engine, ckpt_root: Path, state: TrainerState, keep_last: int,
         before_commit: Optional[Callable[[], None]] = None) -> Path:
    """Save a checkpoint of `engine` and `state` (collective). Returns the final directory.

    `before_commit` runs on every rank once all files are written and before any manifest exists
    (the fault-injection seam that simulates a crash in the middle of a save).

    Raises:
        CheckpointError: on every rank, when the checkpoint could not be written or holds empty or
            missing tensors; the previous checkpoints are untouched then.
    """
    ckpt_root = Path(ckpt_root)
    name = step_dir_name(state.step)
    tmp, final = ckpt_root / (TMP_PREFIX + name), ckpt_root / name
    rank, world = _rank(), _world()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tmp.name, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if before_commit is not None:
        before_commit()

    # The ranks hash and describe the files between them (round robin), then rank 0 commits.
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    mine, error = {}, None
    try:
        for path in files[rank::world]:
            atomic.fsync_file(path)
            mine[str(path.relative_to(tmp))] = describe_file(path)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = f"rank {rank} could not read back {path}: {type(e).__name__}: {e}"
    gathered = _all_gather((mine, error))
    if rank == 0:
        error = next((err for _, err in gathered if err), None)
        if error is None:
            try:
                described = {rel: entry for part, _ in gathered for rel, entry in part.items()}
                _commit(engine, tmp, final, ckpt_root, state, described, keep_last)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    error = _broadcast(error)
    if error is not None:
        raise CheckpointError(f"could not save checkpoint {final}: {error}")
    return final


def _commit(engine, tmp: Path, final: Path, ckpt_root: Path, state: TrainerState, files: dict[str, dict],
            keep_last: int) -> None:
    zero_stage = engine.zero_optimization_stage()
    trainable = trainable_shapes(engine.module)
    problems = check_contents({rel: {**entry, "path": tmp / rel} for rel, entry in files.items()},
                              trainable, zero_stage)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"refusing to mark it complete: {'; '.join(problems[:3])}{more}")
    state_path = tmp / TRAINER_STATE
    state_path.write_text(json.dumps(asdict(state), indent=2))
    files[TRAINER_STATE] = describe_file(state_path)
    manifest = {"format": MANIFEST_FORMAT, "step": state.step, "world_size": state.world_size,
                "zero_stage": zero_stage, "trainable": trainable, "files": dict(sorted(files.items()))}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    atomic.fsync_dir(tmp)
    if final.exists():  # a complete checkpoint of the same step (a re-run after a resume): swap it out
        os.rename(final, ckpt_root / (OLD_PREFIX + final.name))
    os.rename(tmp, final)
    atomic.fsync_dir(ckpt_root)
    shutil.rmtree(ckpt_root / (OLD_PREFIX + final.name), ignore_errors=True)
    prune(ckpt_root, keep_last)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints. Each is renamed away first, so a
    crash halfway through a deletion never leaves a step folder with some of its files."""
    for old in complete_checkpoints(ckpt_root)[:-keep_last]:
        doomed = old.with_name(OLD_PREFIX + old.name)
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Finding, verifying and loading


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [p for p in Path(ckpt_root).iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_incomplete(ckpt_root: Path) -> list[str]:
    """Delete what an interrupted save or deletion left behind (rank 0, at start). Returns the names."""
    removed = []
    if Path(ckpt_root).is_dir():
        for p in sorted(Path(ckpt_root).iterdir()):
            leftover = p.name.startswith((TMP_PREFIX, OLD_PREFIX))
            if leftover or (STEP_DIR.match(p.name) and not (p / MANIFEST).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _manifest(ckpt_dir: Path) -> dict:
    path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} has no file list")
    return manifest


def verify(ckpt_dir: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Check files against the manifest: all of them, or share `part = (index, count)` of them.

    Raises:
        CheckpointError: naming the checkpoint and the first missing, truncated or corrupted file.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} is not a directory")
    manifest = _manifest(ckpt_dir)
    index, count = part
    for rel, meta in sorted(manifest["files"].items())[index::count]:
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} has {size} bytes, the manifest says "
                                  f"{meta['bytes']} (truncated?)")
        if atomic.sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} does not match its sha256 in the "
                                  "manifest (corrupted)")


def verify_collective(ckpt_dir: Path) -> None:
    """`verify` with the files shared out among the ranks; every rank raises the same error."""
    try:
        verify(ckpt_dir, part=(_rank(), _world()))
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def find_resumable(ckpt_root: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete checkpoint that verifies (collective: every rank gets the same answer).

    A broken one is reported, naming its bad file, and the previous one is tried.

    Raises:
        CheckpointError: there are complete checkpoints but none of them verifies (starting over
            silently would throw the run away).
    """
    candidates = complete_checkpoints(ckpt_root)
    skipped = []
    for ckpt in reversed(candidates):
        try:
            verify_collective(ckpt)
        except CheckpointError as e:
            log(f"skipping checkpoint {ckpt.name}: {e}")
            skipped.append(ckpt.name)
            continue
        if skipped:
            log(f"resuming from {ckpt.name}, the newest checkpoint that verifies ({', '.join(skipped)} "
                "did not)")
        return ckpt
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints in {ckpt_root} verifies (see the "
                              "messages above): restore them, or start over with checkpoint.resume=never "
                              "and a new run.output_dir")
    return None


def read_state(ckpt_dir: Path) -> TrainerState:
    path = Path(ckpt_dir) / TRAINER_STATE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {TRAINER_STATE} ({e})") from None
    known = {f.name for f in fields(TrainerState)}
    return TrainerState(**{k: v for k, v in raw.items() if k in known})


def check_compatible(ckpt_dir: Path, *, world_size: int, signature: dict[str, Any],
                     legacy_fingerprint: str) -> TrainerState:
    """The checkpoint's trainer state, if this run can continue it. Reads one small file.

    `signature` is the run's `resume_signature`; checkpoints from before signatures are compared by
    `legacy_fingerprint` instead.

    Raises:
        CheckpointError: a different world size, or a different model / data / compression / batch
            layout (each differing config key named, with both values).
    """
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    problems = []
    if state.world_size != world_size:
        problems.append(
            f"it was written by {state.world_size} ranks and this run has {world_size}: resume with the same "
            f"number of ranks (deepspeed --num_gpus {state.world_size} ...), or export it "
            f"(launch/export.py) and start a new run from the exported model")
    if state.signature:
        differ = [key for key in sorted(set(state.signature) | set(signature))
                  if state.signature.get(key) != signature.get(key)]
        for key in differ:
            problems.append(f"{key} was {_short(state.signature, key)} and is now {_short(signature, key)}")
    elif state.config_fingerprint != legacy_fingerprint:  # written before signatures: one hash to compare
        problems.append("its model/data/compression/batch config differs from this run's")
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} cannot be resumed by this run: {'; '.join(problems)}. Resume with the "
            f"config saved in its run directory ({ckpt_dir.parent.parent / 'config.yaml'}), or start a new run "
            "(a new run.output_dir, or checkpoint.resume=never)")
    return state


def _short(signature: dict[str, Any], key: str, limit: int = 120) -> str:
    if key not in signature:
        return "unset"
    text = json.dumps(signature[key], sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# What a resume says when the optimizer state cannot go into this run's optimizer.
RESTART_ADVICE = ("export it (launch/export.py --model <its run directory>) and start a new run from the exported "
                  "model (its weights, a fresh optimizer), or start over (a new run.output_dir, or "
                  "checkpoint.resume=never)")


def check_optimizer_groups(ckpt_dir: Path, state: TrainerState, groups: list[list[str]]) -> None:
    """Raises CheckpointError when the checkpoint's optimizer groups (recorded since they are) differ from `groups`,
    this run's, naming the first difference; DeepSpeed would fail on the flat buffers' sizes without saying why."""
    if not state.optimizer_groups or state.optimizer_groups == groups:
        return
    saved = state.optimizer_groups
    index = next((i for i, (a, b) in enumerate(zip(saved, groups)) if a != b), min(len(saved), len(groups)))
    what = (f"group {index} holds {_first_names(saved[index])} there and {_first_names(groups[index])} here"
            if index < min(len(saved), len(groups)) else f"{len(saved)} groups there, {len(groups)} here")
    raise CheckpointError(f"checkpoint {ckpt_dir} cannot be resumed by this run: its optimizer state is laid out in "
                          f"other parameter groups ({what}), as a different kvforge version or set of trainable "
                          f"parameters groups them; {RESTART_ADVICE}")


def _first_names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} parameters)"


def load(engine, ckpt_dir: Path, groups: Optional[list[list[str]]] = None) -> TrainerState:
    """Load a verified, compatible checkpoint into the engine and restore this rank's RNG (collective). `groups`: this
    run's optimizer groups by name (stages.optimizer_layout), checked against the checkpoint's first.

    Raises:
        CheckpointError: the optimizer groups differ, or DeepSpeed could not load the optimizer state into this
            engine (a checkpoint from before kvforge recorded its groups, e.g. before it gave every parameter whose
            length is not a multiple of 8 values a group of its own).
    """
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if groups is not None:
        check_optimizer_groups(ckpt_dir, state, groups)
    try:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        # Groups recorded and equal: the cause is elsewhere, so no guess about it.
        why = ("" if state.optimizer_groups else
               " A checkpoint written before kvforge recorded its optimizer groups (before 2026-11-30, when every "
               "parameter whose length is not a multiple of 8 values got a group of its own) cannot continue with "
               "its optimizer state.")
        raise CheckpointError(
            f"DeepSpeed could not load checkpoint {ckpt_dir} into this run's optimizer ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}).{why} To go on: {RESTART_ADVICE}") from err
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
    set_rng_state(torch.load(ckpt_dir / f"rng_rank{_rank()}.pt", weights_only=False))
    return state
