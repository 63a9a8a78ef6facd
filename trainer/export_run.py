"""Run- and checkpoint-level export: from a training run's files to a model in memory, then to a directory.

    run directory (config.yaml, checkpoints/step_N, metrics.jsonl)
      -> the newest complete checkpoint (verified against its manifest), or the one step asked for
      -> the run's architecture: `build_model` of its config.yaml (LoRA-wrapped if the run used peft)
      -> consolidate_checkpoint: full fp32 weights of any ZeRO stage (the one implementation; training's
         stage switches and its `hf_model` read checkpoints through it too)
      -> check_state_dict (every key and shape, naming the first mismatch) -> load -> LoRA merged
      -> kvforge.models.export.export_model: the verified, self-contained Hugging Face directory

`write_hf_model` is the end-of-training variant: the same rebuild, consolidation, check and merge, written as
the run's plain `hf_model` directory (and the LoRA adapter on its own), as training has always written it.

trainer/ depends on models/, never the reverse: models/export.py knows nothing of runs or checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from .. import atomic
from ..models.export import ExportError, ExportResult, export_model, merge_lora, tied_keys
from ..models.loading import ModelLoadError
from ..suggest import close_matches
from . import checkpoint as ckpt
from .build import build_model
from .config import Config, ConfigError, load_config
from .tracking import read_metrics

# DeepSpeed's files in a checkpoint step: the module state (whole below ZeRO-3, placeholders or absent under
# it) and, with ZeRO, one optimizer-state file per rank holding that rank's partition of the fp32 masters.
MODULE_STATE = "mp_rank_00_model_states.pt"
ZERO_STATES = "*zero_pp_rank_*_optim_states.pt"


# ================================================================================================
# Sources: a run, a checkpoint
# ================================================================================================


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> ExportResult:
    """The newest complete checkpoint of a training run (verified against its manifest).

    Raises:
        ExportError: no such run directory, or no complete checkpoint in it.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    skipped: list[str] = []
    latest = ckpt.find_resumable(run_dir / "checkpoints", log=skipped.append)
    if latest is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise ExportError(f"run directory {run_dir} holds no complete checkpoint under checkpoints/{why}; "
                          "export a checkpoint with --checkpoint or a model directory with --model")
    return export_checkpoint(latest, out_dir, run_dir=run_dir, **options)


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                      run_dir: Optional[str | os.PathLike] = None, **options: Any) -> ExportResult:
    """One checkpoint step (`<run>/checkpoints/step_N`), rebuilt in the architecture of its run's config.yaml.

    Raises:
        ExportError: a missing or incomplete checkpoint, a missing run config, or weights that do not fit the
            run's architecture (naming the key and both shapes).
    """
    ckpt_dir = Path(ckpt_dir).expanduser()
    if not ckpt_dir.is_dir():
        raise ExportError(f"checkpoint {ckpt_dir} does not exist")
    run_dir = Path(run_dir).expanduser() if run_dir is not None else ckpt_dir.parent.parent
    try:
        ckpt.verify(ckpt_dir)
        state = ckpt.read_state(ckpt_dir)
    except (ckpt.CheckpointError, OSError, json.JSONDecodeError, TypeError) as err:
        raise ExportError(f"checkpoint {ckpt_dir} is not a complete kvforge checkpoint: {err}") from None
    cfg = run_config(run_dir)
    model, tokenizer = build_run_model(cfg, run_dir)
    model = load_run_weights(model, consolidate_checkpoint(ckpt_dir), where=f"checkpoint {ckpt_dir}")
    source = {"kind": "checkpoint", "path": str(ckpt_dir), "run_dir": str(run_dir), "step": state.step,
              "tokens_seen": state.tokens_seen, "base_model": cfg.model.name}
    evaluations = list(options.pop("evaluations", None) or [])
    final_eval = run_eval_at(run_dir, state.step)
    if final_eval is not None:
        evaluations.insert(0, final_eval)
    return export_model(model, tokenizer, out_dir, source=source, evaluations=evaluations, **options)


def run_config(run_dir: Path) -> Config:
    """The resolved config.yaml every run writes. Raises ExportError without one or for one that does not load."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"run directory {run_dir} has no config.yaml (the resolved config every run writes); "
                          "is this a kvforge run directory?")
    try:
        return load_config(path)
    except ConfigError as err:
        raise ExportError(f"{path}: {err}") from None


def build_run_model(cfg: Config, run_dir: Path):
    """(model, tokenizer) in the architecture the run trained, LoRA-wrapped if it used peft: the trainer's
    own `build_model`, whole (a compressed run starts from `<run>/compressed_init`). Weights are loaded next."""
    try:
        return build_model(cfg, None, run_dir)
    except (ModelLoadError, OSError) as err:
        raise ExportError(f"cannot rebuild the architecture of run {run_dir}: {err}") from None


def run_eval_at(run_dir: Path, step: int) -> Optional[dict]:
    """The run's last eval at or before `step`, from its metrics.jsonl (None without one)."""
    evals = [record for at, record in read_metrics(run_dir, "eval/loss").items() if at <= step]
    if not evals:
        return None
    record = max(evals, key=lambda r: r["step"])
    return {"task": "run_eval", "step": record["step"], "loss": record["eval/loss"],
            "perplexity": record.get("eval/perplexity")}


# ================================================================================================
# Weights: ZeRO consolidation, key/shape checks, LoRA merge
# ================================================================================================


def consolidate_checkpoint(ckpt_dir: str | os.PathLike, zero_stage: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer a DeepSpeed checkpoint of any ZeRO stage holds, by module name, at the best
    precision it holds them (fp32 where it has fp32 masters).

    Below ZeRO-3 the module state (mp_rank_00_model_states.pt) has all of them in the training dtype (ZeRO-3
    writes per-rank placeholders instead); with ZeRO, DeepSpeed's zero_to_fp32 gives the fp32 master weights of
    the trained ones and the frozen ones ZeRO-2/3 store beside them, and these take precedence. `zero_stage`
    None: read off the files present.

    Raises ExportError naming the files expected when the folder holds no DeepSpeed model state.
    """
    ckpt_dir = Path(ckpt_dir)
    module_file = ckpt_dir / MODULE_STATE
    has_zero = any(ckpt_dir.glob(ZERO_STATES))
    read_module = module_file.is_file() if zero_stage is None else zero_stage < 3
    read_zero = has_zero if zero_stage is None else zero_stage > 0
    if not (read_module or read_zero):
        raise ExportError(f"checkpoint {ckpt_dir} holds no DeepSpeed model state: expected "
                          f"{ZERO_STATES.lstrip('*')} (ZeRO 1-3) or {MODULE_STATE} (no ZeRO)")
    weights: dict[str, torch.Tensor] = {}
    if read_module:
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        weights = {name: tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
                   for name, tensor in module.items()}
    if read_zero:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        weights.update({name: tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
                        for name, tensor in masters.items()})
    return weights


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raises ExportError unless `state` has exactly the model's tensors (tied copies may be absent), naming
    the first mismatched key and both shapes."""
    expected = model.state_dict()
    tied = tied_keys(model)
    for key, value in state.items():
        if key not in expected:
            raise ExportError(f"{where} has weight {key!r} {tuple(value.shape)} that the model does not have "
                              f"({_close_keys(key, expected)}); the run's config does not match these weights")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ExportError(f"{where}: weight {key!r} has shape {tuple(value.shape)} but the model built from the "
                              f"run's config expects {tuple(expected[key].shape)}; the run's config does not match "
                              "these weights")
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        raise ExportError(f"{where} lacks {len(missing)} weight(s) the model has, first {missing[0]!r} "
                          f"{tuple(expected[missing[0]].shape)}")


def _close_keys(key: str, keys: Iterable[str]) -> str:
    close = close_matches(key, keys, cutoff=0.8)
    return f"closest: {close[0]!r}" if close else "no similar key"


def load_checked_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Loads `state` into `model` (peft-wrapped if the run trained LoRA adapters) after `check_state_dict`."""
    check_state_dict(model, state, where)
    model.load_state_dict(state, strict=False)  # strict on everything but tied copies, checked above
    return model


def load_run_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Loads checked weights into `model` (peft-wrapped if the run trained LoRA adapters) and merges LoRA."""
    return merge_lora(load_checked_weights(model, state, where))


# ================================================================================================
# The end of training: <run>/hf_model (and <run>/lora_adapter)
# ================================================================================================


def write_hf_model(cfg: Config, tokenizer: Any, ckpt_dir: Path, out_dir: Path, zero_stage: int) -> None:
    """A consolidated Hugging Face directory (safetensors) from any ZeRO stage, LoRA merged, written atomically.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer state, so they are rebuilt from the
    checkpoint `ckpt_dir` just written (never from the live module, whose ZeRO-3 parameters are empty
    placeholders). They are loaded into a whole copy of the model (every key and shape checked); a LoRA run's
    adapter is saved on its own beside `out_dir` (`lora_adapter/`), then merged, and the model saved. Rank 0
    only (the caller arranges that).
    """
    model, _ = build_run_model(cfg, out_dir.parent)
    model = load_checked_weights(model, consolidate_checkpoint(ckpt_dir, zero_stage), where=f"checkpoint {ckpt_dir}")
    if cfg.training.lora.r:
        with atomic.directory(out_dir.with_name("lora_adapter")) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _check_saved_tensors(tmp)
    model = merge_lora(model)
    model.config.use_cache = True
    with atomic.directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_saved_tensors(tmp)


def _check_saved_tensors(directory: Path) -> None:
    """Every tensor of every safetensors file in `directory` has elements (the ZeRO-3 trap: a module's
    placeholders saved as the model or adapter, shape [0])."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{directory} holds no .safetensors file")
    for path in files:
        empty = [k for k, meta in ckpt.tensor_shapes(path).items() if 0 in meta["shape"]]
        if empty:
            raise RuntimeError(f"{path} has empty tensors {empty[:5]}: refusing to export it")


__all__ = ["export_run", "export_checkpoint", "run_config", "build_run_model", "run_eval_at", "consolidate_checkpoint",
           "check_state_dict", "load_checked_weights", "load_run_weights", "write_hf_model"]
