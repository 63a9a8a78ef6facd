"""Turn a model in memory into a self-contained, verified Hugging Face directory.

    model (any kvforge loads or builds; a peft-wrapped one has its LoRA merged)
      -> .DIR.tmp-<pid>/ beside DIR (kvforge.atomic.directory): safetensors (sharded past
         max_shard_size), config.json with the whole compression spec and auto_map, the modeling code
         (modeling_kvforge.py, configuration_kvforge.py, pyramid.py and everything they import
         relatively, kernel files included), tokenizer, generation config, README.md (model card),
         kvforge_export.json (what was exported, size + sha256 per file)
      -> verified: the config reloads into the same spec, every weight file of the index exists, every
         tensor is there with the right shape, dtype and value, every bundled module's relative imports
         are bundled too
      -> renamed to DIR (the old DIR, if --overwrite, is moved aside first and removed after)

So DIR either does not exist or holds a complete, verified export: an interrupted export leaves only a
.DIR.tmp-* folder, which nothing loads and the next export to DIR removes.

Runs and checkpoints (ZeRO consolidation, the run's architecture, its evals) are the trainer's business:
kvforge.trainer.export_run reads them into a model and hands it to `export_model` here. Nothing in models/
imports the trainer.

A KVForge model loads in a process without kvforge:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. A plain model exports as a normal
Hugging Face directory (no code, no auto_map).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
import transformers

from kvforge import atomic
from kvforge.models.configuration_kvforge import head_dim_of
from kvforge.models.errors import ExportError

EXPORT_MANIFEST = "kvforge_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Modules bundled with every KVForge export even when the modeling file does not import them (yet):
# pyramid.py gives generate-time PyramidKV to a process without kvforge.
EXTRA_MODULES = ("pyramid",)
# The cache measurement done on every KVForge export: a generate() over this many positions (a random
# prompt of up to 48 tokens, the rest generated).
MEASURE_TOKENS = 64
DECODING_STEPS = 32


def _declared_range(package: str) -> str:
    """The version range pyproject.toml declares for `package` (its upper bound is the newest release tested)."""
    from importlib import metadata

    try:
        requirements = metadata.requires("kvforge") or []
    except metadata.PackageNotFoundError:
        return "unknown (kvforge is not installed)"
    for requirement in requirements:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        if name.lower() == package and ";" not in requirement:
            return requirement[len(name):].strip() or "any"
    return "unknown"


TESTED_TRANSFORMERS = _declared_range("transformers")

_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.MULTILINE)
# The modeling file imports the kernel dispatch from the installed package; bundled, the kernel files sit flat
# beside it, so that import becomes relative (the form transformers copies along with the modeling file).
_KERNEL_IMPORT = re.compile(r"^(\s*)from\s+kvforge\.kernels\.(\w+)\s+import", re.MULTILINE)


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    num_parameters: int
    dtype: str
    kvforge: bool                       # a KVForge model (code bundled) or a plain Hugging Face model
    kv_cache: dict[str, Any]            # bytes/token: spec arithmetic, original, measured
    source: dict[str, Any]
    seconds: float
    evaluations: list[dict] = field(default_factory=list)


# ================================================================================================
# Sources: a model kvforge loads
# ================================================================================================


def export_pretrained(name: str, out_dir: str | os.PathLike, *, gguf_file: Optional[str] = None,
                      **options: Any) -> ExportResult:
    """Any model kvforge loads: a Hugging Face or KVForge directory, a hub id, a .gguf file, the embedded
    SmolLM2. Raises ExportError for what `load_pretrained` cannot load."""
    from kvforge.models.loading import ModelLoadError, load_pretrained

    try:
        model, tokenizer = load_pretrained(name, gguf_file=gguf_file, dtype="float32")
    except (ModelLoadError, OSError) as err:
        raise ExportError(f"cannot load model {name!r}: {err}") from None
    return export_model(model, tokenizer, out_dir, source={"kind": "model", "path": name}, **options)


# ================================================================================================
# Weights: tied copies, LoRA merge
# ================================================================================================


def tied_keys(model: torch.nn.Module) -> set[str]:
    """Parameters that are the same tensor as another (tied embeddings): they appear once in a consolidated or
    saved state dict."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A peft-wrapped model with its adapters folded into the base weights; any other model as it is."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model


# ================================================================================================
# The export itself
# ================================================================================================


def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "2GB",
    pyramid: Optional[Mapping[str, Any]] = None,
    evaluations: Optional[list[dict]] = None,
    source: Optional[dict[str, Any]] = None,
    overwrite: bool = False,
    measure_tokens: int = MEASURE_TOKENS,
    decoding_steps: int = DECODING_STEPS,
    format: str = "kvforge",
) -> ExportResult:
    """Writes `model` (+ tokenizer) to `out_dir` atomically and verified (see the module docstring).

    `model` itself is exported: LoRA is merged into it, it is cast to `dtype` and a PyramidKV default goes
    into its config, in place (a copy would double the memory of a large model); pass a copy to keep yours.

    pyramid: PyramidKV settings stored as the export-time default `compression.inference.pyramid`; a plain
        Llama / Mistral / Qwen2 model is converted to the equivalent all-dense KVForge model first (`as_kvforge`).
    evaluations: result dicts (launch/evaluate.py --json, or {"task": "run_eval", ...}) shown in the card.
    measure_tokens: positions of the generate() whose cache is measured (KVForge models; 0 skips it).
    decoding_steps: greedy steps of the check that cached decoding picks the tokens the uncached model prefers
        (KVForge models: `check_cached_decoding`, batch of two left-padded prompts; 0 skips it).
    format: "kvforge" (the KVForge class), "stock" or "auto" (a stock transformers class where the layout maps
        onto one exactly, checked before writing: kvforge.models.stock).

    Raises:
        ExportError: an existing out_dir without overwrite, a bad dtype / pyramid, or an export that fails
            its own verification (naming the file or tensor).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another directory or pass overwrite=True (--overwrite)")
    if out_dir.exists() and not (out_dir / EXPORT_MANIFEST).is_file() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not a kvforge export (no {EXPORT_MANIFEST}); refusing to "
                          "replace it")
    model = merge_lora(model).eval()
    stock = None
    if format != "kvforge":  # --format auto|stock: kvforge.models.stock
        from kvforge.models.stock import convert_for_export

        model, stock = convert_for_export(model, format, pyramid=pyramid, warn=lambda m: print(m, file=sys.stderr))
    is_kvforge = getattr(model.config, "model_type", None) == "kvforge"
    if pyramid is not None and not is_kvforge:
        model, is_kvforge = as_kvforge(model), True
    if measure_tokens < 0 or measure_tokens == 1:
        raise ExportError(f"measure_tokens={measure_tokens}: expected 0 (no measurement) or at least 2")
    # Decoding is checked in the dtype the model arrives in (training's, usually fp32: the tightest tolerance,
    # and fast on CPUs without bf16 units); the cache plumbing it guards does not depend on the dtype.
    decoding = check_decoding(model, decoding_steps) if is_kvforge and decoding_steps else None
    model = model.to(DTYPES[dtype])
    kv_cache = kv_cache_summary(model, measure_tokens if is_kvforge else 0)
    if stock is not None and stock.kvforge_config is not None:
        from kvforge.models.stock import stock_kv_summary

        kv_cache = stock_kv_summary(model, stock, measure_tokens)
    if pyramid is not None:
        set_pyramid_default(model.config, pyramid)
        kv_cache["pyramid"] = dict(model.config.compression["inference"]["pyramid"])
    evaluations = list(evaluations or [])
    source = dict(source or {"kind": "model"})

    with atomic.directory(out_dir) as tmp:
        _write(model, tokenizer, tmp, max_shard_size)
        bundled = bundle_code(model, tmp) if is_kvforge else []
        num_parameters = sum(p.numel() for p in model.parameters())
        card = model_card(model, tokenizer, kv_cache, evaluations, source, dtype, num_parameters, out_dir.name)
        if stock is not None and stock.kvforge_config is not None:
            from kvforge.models.stock import stock_card

            card = stock_card(card, stock, kv_cache)
        (tmp / "README.md").write_text(card)
        verify_config(tmp, model)
        verify_weights(tmp, model)
        verify_code(tmp)
        manifest = {
            "format": 1, "kvforge": is_kvforge, "dtype": dtype, "num_parameters": num_parameters,
            "source": source, "kv_cache": kv_cache, "decoding_check": decoding, "evaluations": evaluations,
            "bundled_code": bundled, "transformers": _transformers_versions(),
            **({"stock": stock.record} if stock is not None else {}),
            "files": _file_table(tmp),
        }
        _write_json(tmp / EXPORT_MANIFEST, manifest)
    return ExportResult(out_dir=out_dir, files=sorted(manifest["files"]) + [EXPORT_MANIFEST],
                        num_parameters=num_parameters, dtype=dtype, kvforge=is_kvforge, kv_cache=kv_cache,
                        source=source, seconds=time.perf_counter() - started, evaluations=evaluations)


def _write(model: torch.nn.Module, tokenizer: Any, tmp: Path, max_shard_size: str | int) -> None:
    from transformers import GenerationConfig

    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    use_cache = model.config.use_cache
    model.config.use_cache = True  # a trained model had it off; the exported one generates with a cache
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        model.config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        model.generation_config.save_pretrained(tmp)


def set_pyramid_default(config, pyramid: Mapping[str, Any]) -> None:
    """Stores PyramidKV settings as `compression.inference.pyramid`, validated by the config's own spec."""
    compression = {**config.compression}
    compression["inference"] = {**(compression.get("inference") or {}), "pyramid": dict(pyramid)}
    try:
        spec = type(config.compression_spec).from_dict(compression)
        spec.validate(config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                      config.head_dim)
    except ValueError as err:
        raise ExportError(f"the config cannot hold this PyramidKV default: {err}") from None
    compression["inference"]["pyramid"] = spec.pyramid.to_dict()  # the compact, validated form
    config.compression = compression


# ================================================================================================
# Code bundle
# ================================================================================================


def _module_search_path(model: torch.nn.Module) -> list[Path]:
    """Where bundled modules are looked up: beside the model's own modeling file (the package's models/, or
    an exported copy), then the package's models/ and kernels/ (kernels are copied flat)."""
    import kvforge.kernels
    import kvforge.models

    here = Path(sys.modules[type(model).__module__].__file__).parent
    paths = [here, Path(kvforge.models.__file__).parent, Path(kvforge.kernels.__file__).parent]
    return list(dict.fromkeys(p.resolve() for p in paths))


def relative_imports(source: str) -> set[str]:
    """Module names a file imports relatively (`from .x import y`, `import .x`), as transformers reads them:
    by text, inside `try` blocks too, so every one of them must be present beside it."""
    return {a or b for a, b in _RELATIVE_IMPORT.findall(source)}


def flatten_kernel_imports(source: str) -> str:
    """`from kvforge.kernels.X import ...` -> `from .X import ...` (X.py is bundled flat beside it)."""
    return _KERNEL_IMPORT.sub(lambda m: f"{m.group(1)}from .{m.group(2)} import", source)


def bundle_code(model: torch.nn.Module, out_dir: Path) -> list[str]:
    """Copies the model's modeling and config modules, EXTRA_MODULES and, transitively, every module they
    import relatively (the kernel dispatch and kernels included), flat into out_dir. Returns the file names. Raises ExportError for an import that
    cannot be found."""
    search = _module_search_path(model)
    wanted = [Path(sys.modules[type(model).__module__].__file__).stem,
              Path(sys.modules[type(model.config).__module__].__file__).stem, *EXTRA_MODULES]
    sources: dict[str, str] = {}
    while wanted:
        name = wanted.pop()
        if name in sources:
            continue
        found = next((d / f"{name}.py" for d in search if (d / f"{name}.py").is_file()), None)
        if found is None:
            raise ExportError(f"module {name!r} is imported relatively by the modeling code but {name}.py is in "
                              f"none of {', '.join(map(str, search))}")
        sources[name] = flatten_kernel_imports(found.read_text())
        wanted.extend(relative_imports(sources[name]) - set(sources))
    for name, source in sources.items():
        (out_dir / f"{name}.py").write_text(source)
    _ensure_auto_map(model, out_dir)
    return sorted(f"{name}.py" for name in sources)


def _ensure_auto_map(model: torch.nn.Module, out_dir: Path) -> None:
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    auto_map = {
        "AutoConfig": f"{type(model.config).__module__.rsplit('.', 1)[-1]}.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"{type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}",
    }
    if config.get("auto_map") != auto_map:
        config["auto_map"] = auto_map
        _write_json(config_path, config)


# ================================================================================================
# Verification
# ================================================================================================


def weight_files(out_dir: Path) -> dict[str, list[str]]:
    """file -> tensor names, from model.safetensors.index.json or the single model.safetensors.

    Raises ExportError naming a missing index, a missing weight file or an unreadable one.
    """
    from safetensors import safe_open

    index = out_dir / "model.safetensors.index.json"
    single = out_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ExportError(f"{index} is not a safetensors index ({err})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
    elif single.is_file():
        files = {single.name: None}
    else:
        raise ExportError(f"{out_dir} has no weights: neither model.safetensors nor model.safetensors.index.json")
    listed = {}
    for file, names in files.items():
        path = out_dir / file
        if not path.is_file():
            raise ExportError(f"{out_dir}: weight file {file} is missing (listed in model.safetensors.index.json)")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise ExportError(f"{out_dir}: weight file {file} is unreadable ({err})") from None
        if names is not None and set(names) - set(keys):
            raise ExportError(f"{out_dir}: weight file {file} lacks {sorted(set(names) - set(keys))[0]!r}, which the "
                              "index places there")
        listed[file] = keys
    return listed


def verify_config(out_dir: Path, model: torch.nn.Module) -> None:
    """config.json reloads (for KVForge: the spec validates again) into the model's architecture and spec."""
    try:
        reloaded = type(model.config).from_pretrained(out_dir)
    except (OSError, ValueError) as err:
        raise ExportError(f"{out_dir}/config.json does not reload: {err}") from None
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "compression"):
        if getattr(reloaded, key, None) != getattr(model.config, key, None):
            raise ExportError(f"{out_dir}/config.json reloads with {key}={getattr(reloaded, key, None)!r}, the model "
                              f"has {getattr(model.config, key, None)!r}")


def verify_weights(out_dir: Path, model: torch.nn.Module) -> None:
    """Every tensor of `model` (tied copies aside) is in the written files, with its shape, dtype and value."""
    from safetensors import safe_open

    expected = model.state_dict()
    tied = tied_keys(model)
    seen = set()
    for file, keys in weight_files(out_dir).items():
        with safe_open(str(out_dir / file), framework="pt") as f:
            for key in keys:
                if key not in expected:
                    raise ExportError(f"{out_dir}/{file} holds {key!r}, which the model does not have")
                written, want = f.get_tensor(key), expected[key]
                if written.shape != want.shape or written.dtype != want.dtype:
                    raise ExportError(f"{out_dir}/{file}: {key!r} was written as {written.dtype} "
                                      f"{tuple(written.shape)}, the model has {want.dtype} {tuple(want.shape)}")
                if not torch.equal(written, want.detach().cpu()):
                    raise ExportError(f"{out_dir}/{file}: {key!r} differs from the model's tensor")
                seen.add(key)
    missing = [k for k in expected if k not in seen and k not in tied]
    if missing:
        raise ExportError(f"{out_dir}: {len(missing)} tensor(s) were not written, first {missing[0]!r}")


def verify_code(out_dir: Path) -> None:
    """Bundled modules compile, and each one's relative imports are bundled (transformers requires them)."""
    config = json.loads((out_dir / "config.json").read_text())
    modules = {entry.split(".")[0] for entry in (config.get("auto_map") or {}).values() if isinstance(entry, str)}
    for name in sorted(modules):
        if not (out_dir / f"{name}.py").is_file():
            raise ExportError(f"{out_dir}: config.json auto_map names {name}.py, which is missing")
    for path in sorted(out_dir.glob("*.py")):
        source = path.read_text()
        compile(source, str(path), "exec")
        for needed in relative_imports(source):
            if not (out_dir / f"{needed}.py").is_file():
                raise ExportError(f"{out_dir}: {path.name} imports .{needed}, but {needed}.py is not bundled")


def verify_export(out_dir: str | os.PathLike) -> dict:
    """Checks an exported directory against its manifest: every file present with its size and sha256.

    Returns the manifest. Raises ExportError naming the first missing, truncated or changed file.
    """
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise ExportError(f"exported model {out_dir} does not exist")
    try:
        manifest = json.loads((out_dir / EXPORT_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{out_dir} is not a complete kvforge export: {EXPORT_MANIFEST} unreadable ({err})") from None
    for name, meta in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise ExportError(f"{out_dir}: file {name} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise ExportError(f"{out_dir}: file {name} has {path.stat().st_size} bytes, the manifest says "
                              f"{meta['bytes']} (truncated?)")
        if atomic.sha256_file(path) != meta["sha256"]:
            raise ExportError(f"{out_dir}: file {name} does not match its sha256 in {EXPORT_MANIFEST}")
    return manifest


def _file_table(root: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": atomic.sha256_file(p)}
            for p in sorted(root.iterdir()) if p.is_file()}


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# ================================================================================================
# KV cache numbers and the model card
# ================================================================================================


@torch.no_grad()
def kv_cache_summary(model: torch.nn.Module, measure_tokens: int) -> dict[str, Any]:
    """Bytes/token of the cache in the model's dtype: the original architecture's, the spec's arithmetic
    (long-sequence rate, and at 2k / 4k tokens), and -- if measure_tokens -- the bytes a real generate() of
    that many positions allocated, which must equal the arithmetic at that length (else ExportError)."""
    from kvforge.models.surgery import Geometry, original_kv_bytes_per_token

    dtype = next(model.parameters()).dtype
    config = model.config
    dtype_name = str(dtype).removeprefix("torch.")
    summary: dict[str, Any] = {"dtype": dtype_name,
                               "original_bytes_per_token": original_kv_bytes_per_token(Geometry.of(config), dtype_name)}
    if getattr(config, "model_type", None) != "kvforge":
        summary["bytes_per_token"] = summary["original_bytes_per_token"]
        return summary
    summary["bytes_per_token"] = config.kv_cache_bytes_per_token(dtype)
    summary["bytes_per_token_at"] = {n: config.kv_cache_bytes_per_token(dtype, num_tokens=n) for n in (2048, 4096)}
    if measure_tokens:
        from kvforge.models.surgery import measure_generate_kv_bytes

        prompt_tokens = min(48, measure_tokens // 2)
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, config.vocab_size, (1, prompt_tokens), generator=generator)
        device = next(model.parameters()).device
        # The last generated token is never fed back, so the cache holds prompt + new - 1 positions.
        measured = measure_generate_kv_bytes(model, prompt.to(device),
                                             max_new_tokens=measure_tokens - prompt_tokens + 1)
        tokens = measured["tokens"]
        arithmetic = config.kv_cache_bytes(tokens, dtype)
        if measured["total_bytes"] != arithmetic:
            raise ExportError(f"the cache generate() allocated holds {measured['total_bytes']} bytes after {tokens} "
                              f"tokens but the spec's arithmetic says {arithmetic}; the model does not cache what "
                              "its config describes")
        summary["measured"] = {"tokens": tokens, "bytes": measured["total_bytes"],
                               "bytes_per_token": measured["bytes_per_token"],
                               "original_bytes": summary["original_bytes_per_token"] * tokens}
    return summary


def as_kvforge(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Llama / Mistral / Qwen2 model as the KVForge model of the same computation (every layer global,
    dense K/V: the `standard` preset, an exact conversion that needs no calibration), so a PyramidKV default
    can live in its config and its generate() can compact the cache. Holds a second copy of the weights while
    it is built."""
    from kvforge.models.presets import build_preset
    from kvforge.models.surgery import SurgeryError, compress

    try:
        return compress(model, build_preset("standard", model.config), None,
                        settings={"show_progress": False}).model.eval()
    except SurgeryError as error:
        raise ExportError(f"a PyramidKV default needs a KVForge model, and this "
                          f"{getattr(model.config, 'model_type', '?')} model cannot be converted to one: {error}")


def check_decoding(model: torch.nn.Module, steps: int) -> dict[str, Any]:
    """Cached greedy decoding == the uncached model's choices (the check ships in the modeling file, so users can
    rerun it where they serve the model); wrong tokens with the right cache bytes would otherwise pass."""
    from kvforge.models.modeling_kvforge import check_cached_decoding

    try:
        return check_cached_decoding(model, new_tokens=steps)
    except RuntimeError as error:
        raise ExportError(f"the model fails its decoding check under transformers {transformers.__version__}: "
                          f"{error}") from error


def _transformers_versions() -> dict[str, str]:
    """The transformers this export was made with and the range kvforge tested (the model card repeats it)."""
    return {"exported_with": transformers.__version__, "tested": TESTED_TRANSFORMERS}


def read_evaluations(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Result JSON files of launch/evaluate.py. Raises ExportError for a missing or unreadable one."""
    out = []
    for path in paths:
        path = Path(path).expanduser()
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ExportError(f"evaluation file {path}: {err}") from None
    return out


def describe_layers(config) -> list[tuple[str, str]]:
    """(layer range, description) with runs of identical layers merged: "0-3", "global, dense"."""
    spec = config.compression_spec
    rows: list[list] = []
    for i, layer in enumerate(spec.layers):
        parts = [f"window {layer.window}" + (f" + {layer.sinks} sinks" if layer.sinks else "")
                 if layer.is_window else "global"]
        if layer.kv_from is not None:
            parts.append(f"reads layer {layer.kv_from}'s K/V")
        else:
            if layer.probs_from is not None:
                parts.append(f"reuses layer {layer.probs_from}'s attention over its own values:")
            if layer.kv_proj == "low_rank":
                ranks = (f"v_rank {layer.v_rank}" if layer.probs_from is not None
                         else f"k_rank {layer.k_rank}, v_rank {layer.v_rank}" if layer.rope == "pre_rope_latent"
                         else f"kv_rank {layer.kv_rank}, {layer.rope_dims} RoPE dims")
                rope = f" {layer.rope}" if layer.probs_from is None else ""
                parts.append(f"low-rank{rope} ({ranks})")
            elif layer.kv_proj == "merged_heads":
                parts.append(f"{layer.num_kv_heads} merged KV heads")
            else:
                parts.append("dense")
        text = ", ".join(parts).replace(":,", ":")
        if rows and rows[-1][1] == text and layer.kv_from is None and layer.probs_from is None:
            rows[-1][0][1] = i
        else:
            rows.append([[i, i], text])
    return [(f"{a}" if a == b else f"{a}-{b}", text) for (a, b), text in rows]


def _format_evaluation(ev: dict) -> str:
    task = ev.get("task")
    if task == "run_eval":
        ppl = f", perplexity {ev['perplexity']:.3f}" if ev.get("perplexity") is not None else ""
        return f"| training eval split (step {ev['step']}) | loss {ev['loss']:.4f}{ppl} |"
    if task == "perplexity":
        data = ev.get("data", {})
        return (f"| perplexity, {data.get('source', '?')} eval split, seq_len {data.get('seq_len', '?')} | "
                f"{ev['perplexity']:.3f} (loss {ev['loss']:.4f}, {ev.get('tokens', '?')} tokens) |")
    if task == "passkey":
        pyramid = (ev.get("cache") or {}).get("settings")
        cache = f"PyramidKV {pyramid['schedule']} budget {pyramid['budget']}" if pyramid else "full cache"
        depths = ", ".join(f"{d}: {v['correct']}/{v['samples']}" for d, v in ev["per_depth"].items())
        return f"| passkey at {ev['context_len']} tokens, {cache} | {ev['accuracy']:.3f} ({depths}) |"
    return f"| {task} | {json.dumps({k: v for k, v in ev.items() if not isinstance(v, (list, dict))})} |"


def model_card(model, tokenizer, kv_cache: dict, evaluations: list[dict], source: dict, dtype: str,
               num_parameters: int, name: str) -> str:
    config = model.config
    is_kvforge = getattr(config, "model_type", None) == "kvforge"
    base = getattr(config, "base_model_type", config.model_type)
    original, compressed = kv_cache["original_bytes_per_token"], kv_cache["bytes_per_token"]
    lines = [f"# {name}", "",
             "Exported by kvforge (compression-aware finetuning for a smaller KV cache).", ""]
    where = {"checkpoint": f"checkpoint `{source.get('path')}` (step {source.get('step')}) of run "
                           f"`{source.get('run_dir')}`, base model `{source.get('base_model')}`",
             "model": f"model `{source.get('path')}`" if source.get("path") else "a model in memory"}.get(
        source.get("kind"), json.dumps(source))
    lines += [f"- Source: {where}", f"- Architecture: {base}, {config.num_hidden_layers} layers, "
              f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads, head_dim "
              f"{head_dim_of(config)}, "
              f"{num_parameters:,} parameters, weights in {dtype}", ""]
    lines += ["## KV cache", "", "| | bytes / token |", "| --- | --- |",
              f"| original {base} ({kv_cache['dtype']}) | {original:,} |"]
    if is_kvforge:
        lines.append(f"| this model, long-sequence rate (spec arithmetic) | {compressed:,.0f} "
                     f"({compressed / original:.1%} of the original) |")
        for n, value in kv_cache.get("bytes_per_token_at", {}).items():
            lines.append(f"| this model at {n} tokens (spec arithmetic) | {value:,.0f} |")
        if "measured" in kv_cache:
            m = kv_cache["measured"]
            lines.append(f"| measured: the cache of a generate() over {m['tokens']} positions at export | "
                         f"{m['bytes_per_token']:,.0f} ({m['bytes']:,} bytes allocated, equal to the arithmetic; "
                         f"{m['bytes'] / m['original_bytes']:.1%} of the original's {m['original_bytes']:,}) |")
        lines += ["", "## Method", "",
                  "Per-layer compression spec (the whole spec is `compression` in config.json):", "",
                  "| layers | attention and cache |", "| --- | --- |"]
        lines += [f"| {rows} | {text} |" for rows, text in describe_layers(config)]
        pyramid = kv_cache.get("pyramid")
        if pyramid:
            lines += ["", f"PyramidKV default (`compression.inference.pyramid`): {json.dumps(pyramid)}: after the "
                          "prompt, each layer keeps a token budget shrinking with depth (average "
                          f"{pyramid['budget']} tokens), chosen by the attention of the last prompt tokens."]
    else:
        lines += ["", "An uncompressed model (exported as a plain Hugging Face directory)."]
    lines += ["", "## Evaluation", ""]
    if evaluations:
        lines += ["| evaluation | result |", "| --- | --- |"] + [_format_evaluation(ev) for ev in evaluations]
    else:
        lines.append("No evaluation was recorded with this export.")
    load = "trust_remote_code=True" if is_kvforge else ""
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}"{", " + load if load else ""})',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              'inputs = tokenizer("The capital of France is", return_tensors="pt")',
              "out = model.generate(**inputs, max_new_tokens=20)", "```", ""]
    if is_kvforge:
        lines += ["The modeling code is bundled (modeling_kvforge.py, configuration_kvforge.py, pyramid.py, the "
                  "Triton kernels dispatch.py and latent_attention.py, and what they import); kvforge itself is not "
                  "needed. On a GPU with triton installed, decode over low-rank latent caches runs a fused kernel "
                  "(`KVFORGE_KERNELS=off` forces the PyTorch path). PyramidKV at generate time:", "",
                  "```python", "from transformers.dynamic_module_utils import get_class_from_dynamic_module", "",
                  f'new_pyramid_cache = get_class_from_dynamic_module("pyramid.new_pyramid_cache", "{name}")',
                  'cache = new_pyramid_cache(model, budget=256, schedule="pyramid")',
                  "out = model.generate(**inputs, max_new_tokens=20, cache=cache)", "```", "",
                  "## Compatibility", "",
                  f"Exported with transformers {transformers.__version__}; kvforge tested this modeling code with "
                  f"transformers {TESTED_TRANSFORMERS} (`make compat` in kvforge checks any release). To check this "
                  "directory under the transformers you serve it with (cached greedy decoding must pick the tokens the "
                  "uncached model prefers, and the cache must hold the bytes the spec says):", "",
                  "```python", "import sys", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
                  "print(sys.modules[type(model).__module__].check_cached_decoding(model))", "```", ""]
    return "\n".join(lines)


__all__ = ["ExportError", "ExportResult", "export_pretrained", "export_model", "tied_keys", "merge_lora", "bundle_code",
           "verify_export", "verify_config", "verify_weights", "verify_code", "weight_files", "kv_cache_summary",
           "model_card", "read_evaluations", "set_pyramid_default", "relative_imports", "flatten_kernel_imports"]
