"""Weights & Biases on rank 0: online with a key, offline without one, disabled on request.

Every logged record is also appended to `<run_dir>/metrics.jsonl`, so a run's numbers can be read
without W&B (the tests read it; so can a shell).

A resumed run continues the same W&B run: its id is kept in the run directory and in every
checkpoint's trainer state, and `wandb.init(id=..., resume="allow")` picks it up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from .. import atomic
from .config import ConfigError

RUN_ID_FILE = "wandb_run_id.txt"


def wandb_mode(requested: str) -> str:
    """auto -> online when a key is available, else offline (never prompts, never blocks on a login)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def check_wandb_installed(requested: str) -> None:
    """Fail at once, not after the model and data are built, when the run would log to W&B without wandb installed.

    Raises:
        ConfigError: `requested` (logging.wandb) resolves to online or offline and the wandb package is missing.
    """
    mode = wandb_mode(requested)
    if mode == "disabled" or importlib.util.find_spec("wandb") is not None:
        return
    shown = repr(requested) if requested == mode else f"{requested!r} (resolved to {mode!r})"
    raise ConfigError(f"logging.wandb={shown} needs the wandb package, which is not installed: pip install wandb "
                      "(it is in requirements.lock), or set logging.wandb=disabled")


def read_metrics(run_dir: str | os.PathLike, key: str) -> dict[int, dict]:
    """step -> the last record holding `key` in `<run_dir>/metrics.jsonl` ({} without the file).

    The file is append-only: a resumed run logs the steps it redoes again (the last one is the run's), and a
    line cut short by a crash is skipped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    out: dict[int, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in record:
            out[record["step"]] = record
    return out


class RunLogger:
    """Logs metrics to W&B and to metrics.jsonl, on rank 0 only."""

    def __init__(self, *, mode: str, project: str, entity: Optional[str], name: str, run_dir: Path,
                 config: dict, run_id: Optional[str], rank: int):
        self.rank = rank
        self.run = None
        self.metrics_file = run_dir / "metrics.jsonl"
        self.run_id = run_id
        self.mode = wandb_mode(mode)
        if rank != 0 or self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / RUN_ID_FILE
        if self.run_id is None and id_file.is_file():
            self.run_id = id_file.read_text().strip() or None
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:12]
        atomic.write_text(id_file, self.run_id)
        self.run = wandb.init(
            project=project, entity=entity, name=name, id=self.run_id, resume="allow",
            dir=str(run_dir), mode=self.mode, config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def location(self) -> Optional[str]:
        """Where to find the run: its URL online, its local directory offline."""
        if self.run is None:
            return None
        if self.mode == "online":
            return self.run.url
        return str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        self._append(metrics, step)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summarize(self, metrics: dict[str, Any], step: int) -> None:
        """Facts about the run rather than the step (the model's KV bytes per token, ...): a metrics.jsonl record
        at `step`, and the W&B run summary, where runs are compared side by side (by budget, say). Not a W&B
        history row: a resumed run would log its start step a second time."""
        if self.rank != 0:
            return
        self._append(metrics, step)
        if self.run is not None:
            self.run.summary.update(metrics)

    def _append(self, metrics: dict[str, Any], step: int) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
