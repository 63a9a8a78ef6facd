"""Perplexity of a causal LM over packed rows of token ids.

Every row is a full window of real tokens (trainer/data.py packs documents without padding), so each
row of length L gives L - 1 next-token predictions and all of them count. The result is the
token-weighted mean negative log-likelihood over every prediction of every row evaluated (on all ranks
together when distributed), and its exp.

Shapes: B batch rows, L sequence length, V vocabulary size.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kvforge import atomic

# Logits are turned into float32 log-probabilities this many elements at a time: a batch of 4 x 512
# SmolLM2 logits is 100M values (400 MB in float32), and bf16 logits cast whole would double that.
LOSS_CHUNK_ELEMENTS = 1 << 24


def next_token_nll_sum(logits_BLV: torch.Tensor, input_ids_BL: torch.Tensor) -> torch.Tensor:
    """Sum over all rows and positions t < L-1 of -log p(input_ids[t+1] | logits[t]), in float64.

    Computed in float32 chunk by chunk over positions, so the float32 copy of the logits never exists
    whole (cross-entropy needs the log-sum-exp over V in full precision).
    """
    B, L, V = logits_BLV.shape
    if input_ids_BL.shape != (B, L):
        raise ValueError(f"logits {tuple(logits_BLV.shape)} do not match input_ids {tuple(input_ids_BL.shape)}")
    positions_per_chunk = max(1, LOSS_CHUNK_ELEMENTS // (B * V))
    total = torch.zeros((), dtype=torch.float64, device=logits_BLV.device)
    for start in range(0, L - 1, positions_per_chunk):
        end = min(start + positions_per_chunk, L - 1)
        logits_BCV = logits_BLV[:, start:end].float()
        targets_BC = input_ids_BL[:, start + 1:end + 1]
        nll = F.cross_entropy(logits_BCV.reshape(-1, V), targets_BC.reshape(-1), reduction="sum")
        total += nll.double()
    return total


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    # An HF model in eval mode would otherwise fill a KV cache that nobody reads.
    try:
        accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts_use_cache = False
    return {"use_cache": False} if accepts_use_cache else {}


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    rows: torch.Tensor,
    batch_size: int,
    device: Union[str, torch.device],
    max_batches: Optional[int] = None,
    *,
    distributed: bool = False,
) -> dict[str, float]:
    """Token-weighted mean next-token NLL of `model` over `rows`, and its perplexity.

    Args:
        model: already on `device` (or wrapped by DeepSpeed); called as ``model(input_ids=...)`` and read
            through ``.logits`` [B, L, V] -- any Hugging Face causal LM or module with that contract.
        rows: [N, L] integer token ids, this rank's share of the eval set (L >= 2).
        batch_size: rows per forward pass; the last batch may be smaller.
        device: where each batch is sent.
        max_batches: evaluate at most this many batches (of this rank); None = all rows.
        distributed: sum NLL and token counts over all ranks (torch.distributed all_reduce), so every
            rank returns the same global numbers. Under ZeRO-3 every rank must run the same number of
            batches (each forward gathers parameters from all ranks): give ranks equal row counts.

    Returns:
        {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": predictions counted}.

    Raises:
        ValueError: rows not [N, L>=2] integers, no rows, batch_size or max_batches < 1, or a model
            whose logits do not cover the rows' tokens.
    """
    if rows.ndim != 2 or rows.shape[1] < 2 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"rows must be integer token ids of shape [N, L >= 2], got {rows.dtype} {tuple(rows.shape)}")
    if rows.shape[0] == 0:
        raise ValueError("rows is empty: there is nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")

    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int) and int(rows.max()) >= vocab_size:
        # Checked before the forward: an embedding lookup past its table fails with an unhelpful IndexError.
        raise ValueError(f"rows hold token id {int(rows.max())} but the model's vocabulary has {vocab_size} "
                         "tokens: wrong tokenizer for this model?")
    was_training = model.training
    model.eval()
    kwargs = _forward_kwargs(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = -(-rows.shape[0] // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    tokens = 0
    try:
        for b in range(n_batches):
            input_ids_BL = rows[b * batch_size:(b + 1) * batch_size].to(device=device, dtype=torch.long)
            logits_BLV = model(input_ids=input_ids_BL, **kwargs).logits
            if logits_BLV.shape[:2] != input_ids_BL.shape:
                raise ValueError(f"model returned logits of shape {tuple(logits_BLV.shape)} for input_ids "
                                 f"{tuple(input_ids_BL.shape)}; expected [B, L, V]")
            if b == 0 and int(rows.max()) >= logits_BLV.shape[-1]:
                raise ValueError(f"rows hold token id {int(rows.max())} but the model has only "
                                 f"{logits_BLV.shape[-1]} logits: wrong tokenizer for this model?")
            nll_sum += next_token_nll_sum(logits_BLV, input_ids_BL)
            tokens += input_ids_BL.shape[0] * (input_ids_BL.shape[1] - 1)
            del logits_BLV
    finally:
        model.train(was_training)

    if distributed:
        totals = torch.stack([nll_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        nll_sum, tokens = totals[0], int(totals[1].item())
    loss = nll_sum.item() / tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf  # math.exp overflows past ~709.8
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}


# ----------------------------------------------------------------------------------------------------
# What the evaluation harness (launch/evaluate.py --task suite) needs besides perplexity: a guard that a
# run is not scored on what it trained on, plain text folders as a source, and the KV cache's size.


class TrainingSourceError(ValueError):
    """The eval source is (or overlaps) a source the evaluated run trained or calibrated on."""


def run_training_sources(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The sources a training run read its training rows and calibration rows from, by config key.

    `run_config` is the run's resolved `config.yaml` as a mapping. `teacher-samples` are left out: they are
    sampled from the model, not read from a source anyone could evaluate on.
    """
    data = run_config.get("data") or {}
    sources: dict[str, str] = {}
    mix = data.get("mix") or []
    for i, entry in enumerate(mix):
        sources[f"data.mix[{i}].source"] = entry["source"]
    if not mix:  # a mix replaces data.source for training (calibration still reads data.source, below)
        sources["data.source"] = data.get("source")
    calibration = ((run_config.get("compression") or {}).get("calibration") or {}).get("source")
    # Surgery calibrates on the train split of data.source unless the section names its own source.
    sources["compression.calibration.source"] = calibration or data.get("source")
    return {key: value for key, value in sources.items() if value and value != "teacher-samples"}


def _as_path(source: str, base: Path) -> Optional[Path]:
    """The resolved local path `source` names (relative to `base` or the working directory), else None."""
    raw = Path(source).expanduser()
    for candidate in ([raw] if raw.is_absolute() else [Path.cwd() / raw, base / raw]):
        if candidate.exists():
            return candidate.resolve()
    return None


def sources_overlap(eval_source: str, train_source: str, base: Path) -> bool:
    """True when the two name the same data: the same name, or local paths of which one contains the other
    (a folder and a file inside it, a symlink and its target)."""
    if eval_source == train_source:
        return True
    a, b = _as_path(eval_source, base), _as_path(train_source, base)
    if a is None or b is None:
        return False
    return a == b or a in b.parents or b in a.parents


def check_eval_source(run_dir: Union[str, Path], eval_source: str, *, allow: bool = False) -> dict[str, Any]:
    """Refuse to evaluate a training run on a source it trained or calibrated on.

    Reads `<run_dir>/config.yaml` (the resolved config the run wrote). Relative paths in it are tried from
    the working directory and from the run directory's parent.

    Returns:
        {"run_config", "training_sources": {key: source}, "overlaps": [keys], "allowed": bool} for the JSON.

    Raises:
        TrainingSourceError: `eval_source` overlaps a training source and `allow` is False.
        FileNotFoundError: the run directory has no config.yaml.
    """
    import yaml

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"run directory {run_dir} has no config.yaml: cannot tell what the run trained on "
                                "(evaluate its hf_model/ directly to skip this check)")
    run_config = yaml.safe_load(config_path.read_text()) or {}
    sources = run_training_sources(run_config)
    overlaps = [key for key, source in sources.items()
                if sources_overlap(eval_source, source, Path(run_dir).resolve().parent)]
    if overlaps and not allow:
        named = ", ".join(f"{key}={sources[key]!r}" for key in overlaps)
        raise TrainingSourceError(
            f"eval data {eval_source!r} is what run {run_dir} trained on ({named}, from {config_path}); perplexity "
            "there measures memorisation, not quality. Evaluate on held-out text of another source (e.g. a folder "
            "of plain text files), or pass --allow-training-source to score the run's own data anyway")
    return {"run_config": str(config_path), "training_sources": sources, "overlaps": overlaps,
            "allowed": bool(overlaps) and allow}


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def plain_text_source(source: str, stage_root: Path) -> tuple[str, Optional[dict[str, Any]]]:
    """`source`, or a folder that trainer/data.py reads in its place when `source` is a local file or folder of
    plain text files without a .txt/.md/.rst suffix (e.g. Debian's /usr/share/games/fortunes).

    trainer/data.py reads files by suffix and ignores the rest; here each text file gets a `<name>.txt` symlink
    under `stage_root/<digest of the path>/` (one document per file, as for .txt). Binary files (a NUL byte
    in their first 8 KiB, e.g. fortune's .dat indexes), hidden entries and second links to a file already
    taken (fortune's .u8 links) are skipped. The links keep the files' sizes and mtimes, so the packed-data
    cache stays valid across calls.

    Returns:
        (the source to give trainer/data.py, None) when it reads `source` as it is; otherwise (the staged
        folder, {"staged_from", "staged_as", "files", "skipped_binary"}).
    """
    from .data import SUPPORTED_SUFFIXES

    path = Path(source).expanduser()
    if not path.exists():
        return source, None
    if path.is_file():
        candidates = [] if path.name.lower().endswith(SUPPORTED_SUFFIXES) else [path]
    else:
        candidates = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.lower().endswith(SUPPORTED_SUFFIXES):
                    return source, None  # data.py reads this folder itself; mixing both rules would surprise
                if not name.startswith("."):
                    candidates.append(Path(dirpath, name))
    if not candidates:
        return source, None
    root = path.resolve()
    texts, binary, seen = [], 0, set()
    for file in candidates:
        real = file.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        if _is_binary(real):
            binary += 1
            continue
        texts.append((file, real))
    if not texts:
        raise FileNotFoundError(f"data source {source!r} holds no text files: {binary} binary files, nothing "
                                f"with a {'/'.join(SUPPORTED_SUFFIXES)} suffix")
    staged = Path(stage_root) / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    with atomic.directory(staged) as tmp:  # rebuilt each call: the listing may have changed since the last
        for file, real in texts:
            rel = file.name if path.is_file() else file.relative_to(path).as_posix()
            link = tmp / f"{rel}.txt"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(real)
    return str(staged), {"staged_from": str(root), "staged_as": str(staged), "files": len(texts),
                         "skipped_binary": binary}


def eval_split(source: str, tokenizer: Any, separator: int, *, seq_len: int, eval_fraction: float,
               cache_dir: Optional[str] = None, split_seed: int = 0, text_field: str = "text", split: str = "train",
               config_name: Optional[str] = None, max_documents: Optional[int] = None,
               show_progress: bool = True) -> tuple[Any, dict[str, Any], Optional[dict[str, Any]]]:
    """The held-out rows of `source` as `launch/evaluate.py` and a run's `eval.heldout` both score them: a folder
    of plain text files staged (`plain_text_source`), then packed and split as training packs them.

    Returns (PackedData, the data settings used, the staging record or None).
    """
    from .data import build_packed_datasets, default_cache_dir

    stage_root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "plain-text"
    read_as, staged = plain_text_source(source, stage_root)
    settings = {"source": read_as, "text_field": text_field, "split": split, "config_name": config_name,
                "seq_len": seq_len, "eval_fraction": eval_fraction, "max_documents": max_documents,
                "cache_dir": cache_dir, "seed": split_seed}
    packed = build_packed_datasets(settings, tokenizer, separator, show_progress=show_progress)
    return packed, settings, staged


def is_kvforge(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "kvforge"

