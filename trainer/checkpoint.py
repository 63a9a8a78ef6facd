"""Checkpoints that count only when complete.

Layout under `<run_dir>/checkpoints/`:

    step_00000050/        complete: DeepSpeed engine files, trainer_state.json, rng_rank<r>.pt, MANIFEST.json
    .tmp-step_00000100/   being written (or abandoned by a crash): never loaded, removed on the next start

Every rank writes its engine shards and RNG state into the temporary folder; then rank 0 writes the
trainer state and a manifest (size + sha256 of every file), and only then renames the folder into
place. DeepSpeed does not save RNG states or the data position, so they travel here (the data
position is the step: see trainer/data.py). Resume takes the newest complete checkpoint whose
manifest verifies, and falls back to the previous one when a file is truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file and the reason."""


@dataclass
class TrainerState:
    step: int                   # optimizer steps completed; also the data position
    tokens_seen: int
    world_size: int
    wandb_run_id: Optional[str]
    config_fingerprint: str     # of the parts that must not change across a resume (model, data, compression)
    metrics: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def save(engine, ckpt_root: Path, state: TrainerState, keep_last: int) -> Path:
    """Save on all ranks (collective). Returns the final checkpoint directory."""
    ckpt_root = Path(ckpt_root)
    name = step_dir_name(state.step)
    tmp_name = TMP_PREFIX + name
    tmp, final = ckpt_root / tmp_name, ckpt_root / name
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tmp_name, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": state.step,
            "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        empty = [k for k, v in manifest["files"].items() if v["bytes"] == 0]
        if empty:
            raise CheckpointError(f"checkpoint {tmp} has empty files {empty}: refusing to mark it complete")
        manifest_path = tmp / MANIFEST
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a complete checkpoint of the same step (a re-run after resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        prune(ckpt_root, keep_last)
    _barrier()
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [p for p in Path(ckpt_root).iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(ckpt_root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_incomplete(ckpt_root: Path) -> list[str]:
    """Delete folders a crashed save left behind (rank 0, at start). Returns their names."""
    removed = []
    if Path(ckpt_root).is_dir():
        for p in Path(ckpt_root).iterdir():
            if p.name.startswith(TMP_PREFIX) or (STEP_DIR.match(p.name) and not (p / MANIFEST).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def verify(ckpt_dir: Path) -> None:
    """Check every file against the manifest. Raises CheckpointError naming the first bad file."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: unreadable {MANIFEST} ({e})") from None
    for rel, meta in manifest["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} has {size} bytes, the manifest says "
                                  f"{meta['bytes']} (truncated?)")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} does not match its sha256 in the manifest "
                                  "(corrupted)")


def find_resumable(ckpt_root: Path, log=print) -> Optional[Path]:
    """The newest complete checkpoint that verifies; broken ones are reported and skipped."""
    for ckpt in reversed(complete_checkpoints(ckpt_root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"skipping checkpoint: {e}")
    return None


def read_state(ckpt_dir: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text()))


def load(engine, ckpt_dir: Path, *, world_size: int, config_fingerprint: str) -> TrainerState:
    """Load a verified checkpoint into the engine and restore this rank's RNG (collective)."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if state.world_size != world_size:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written by {state.world_size} ranks but this run has {world_size}: "
            f"resume with the same number of ranks (deepspeed --num_gpus {state.world_size}), or export it "
            "(launch/export.py) and start a new run from the exported model"
        )
    if state.config_fingerprint != config_fingerprint:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written by a run with a different model/data/compression config: "
            "resume it with the config saved in its run directory (config.yaml), or start a new run "
            "(run.name=... or checkpoint.resume=never with a fresh run.output_dir)"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
    rng_file = ckpt_dir / f"rng_rank{_rank()}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
