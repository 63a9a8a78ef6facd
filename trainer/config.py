"""The typed config tree: dataclass defaults <- YAML file <- `key.sub=value` overrides.

Every problem is reported before any model is loaded, as a `ConfigError` naming the key path, the bad
value and what is allowed ("did you mean ..." for misspelt keys). The resolved config is written next
to the run, so a run can always be reproduced from its own directory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvforge import atomic
from kvforge.models.configuration_kvforge import CompressionSpecError
from kvforge.models.presets import PresetError
from kvforge.models.pyramid import PyramidError
from kvforge.models.surgery.compression_config import CompressionConfig
from kvforge.models.surgery.settings import SurgeryError
from kvforge.suggest import did_you_mean


class ConfigError(ValueError):
    """A config problem found before anything expensive happens."""


@dataclass
class RunConfig:
    name: str = "kvforge"
    output_dir: str = "runs/${run.name}"
    seed: int = 1234


@dataclass
class ModelConfig:
    # A hub id, a local Hugging Face directory, a .gguf file, or the embedded default.
    name: str = "smollm2-135m-instruct"
    gguf_file: Optional[str] = None
    # `random` builds the architecture of `name` (with `config` overrides) with random weights.
    init: str = "pretrained"
    config: dict[str, Any] = field(default_factory=dict)
    # dtype the weights are loaded in; training precision is `training.precision`.
    dtype: str = "float32"
    tokenizer: Optional[str] = None


@dataclass
class TeacherSamplesConfig:
    # The `teacher-samples` source: text the original (teacher) model writes itself, sampled once and cached
    # (trainer/data.py). No dataset needed, and its distribution is the one the student is distilled toward.
    # Tokens to sample (train and eval together; eval takes data.eval_fraction of the samples, >= one row).
    tokens: int = 1_000_000
    # Tokens per sample, its document-start token and prefix included; null = data.seq_len. Long samples keep
    # long-range dependencies in the data (256-token samples measurably lost passkey retrieval).
    sample_len: Optional[int] = None
    # Each sample's temperature is drawn uniformly from [temperature_min, temperature_max] (variety without
    # a second run); nucleus sampling with top_p after the temperature.
    temperature_min: float = 0.7
    temperature_max: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    # A sample starts with the document separator; this fraction of them continue a short window of
    # `prefix_tokens` tokens of real text from `prefix_source` (its train split) for variety of topics.
    prefix_source: Optional[str] = None
    prefix_fraction: float = 0.0
    prefix_tokens: int = 16
    # This fraction of the samples (outside the prefixed ones) start with an instruction in the tokenizer's chat
    # template asking for a piece of writing (a story, a poem, a letter, ...), which the teacher then writes: an
    # instruct model from a bare document start mostly writes markup and code. `instructions`: a text file of
    # one instruction per line; null = the built-in tasks x topics (trainer/instructions.py).
    instruction_fraction: float = 0.0
    instructions: Optional[str] = None
    # false: the teacher may end a document (separator token) and start another inside one sample, as in
    # packed pretraining text; true: the separator is never sampled, one document per sample.
    suppress_eos: bool = False
    # Samples per generate() call.
    batch_size: int = 32
    # auto: bfloat16 on a GPU, the teacher's own dtype on CPU.
    dtype: str = "auto"
    # static: kvforge's sampler (trainer/sampling.py): a preallocated KV cache, each decode step one CUDA graph on
    # a GPU; Llama, Mistral and Qwen2 teachers. generate: transformers' generate(). auto: static where supported.
    engine: str = "auto"
    # How the static engine's decode steps attend (trainer/sampling.py ATTENTION): auto (matmul), triton (the decode
    # kernel, one CUDA graph for every position), matmul, sdpa. Not part of the samples' cache key: the same
    # distribution, drawn through other kernels.
    attention: str = "auto"


def without_unused_instructions(settings: dict[str, Any]) -> dict[str, Any]:
    """Teacher-samples settings (as a mapping) without the instruction keys when no sample is instructed: they
    then change no token, and samples cached and checkpoints saved before the keys existed keep their keys."""
    if settings.get("instruction_fraction"):
        return settings
    return {k: v for k, v in settings.items() if k not in ("instruction_fraction", "instructions")}


@dataclass
class MixEntry:
    # A source as in data.source (teacher-samples included) and its share of the training rows.
    source: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # python-docs | stdlib-docstrings | teacher-samples | a local file/folder | a Hugging Face dataset name.
    source: str = "python-docs"
    # Several sources, each with a share of the training rows (weights are normalised); when non-empty it
    # replaces `source` for training and eval (calibration still reads `source`). Needs >= 2 entries.
    mix: list[MixEntry] = field(default_factory=list)
    # Reading a source more than once in a run (epochs > 1) is allowed only with repeat=true; either way the
    # run logs how many times it read each source, at the start (planned) and at the end (data/epochs/*).
    repeat: bool = True
    teacher_samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    text_field: str = "text"
    split: str = "train"
    config_name: Optional[str] = None
    seq_len: int = 512
    eval_fraction: float = 0.05
    max_documents: Optional[int] = None
    cache_dir: Optional[str] = None


@dataclass
class LoraConfig:
    # r = 0 trains every parameter; r > 0 freezes the model and trains LoRA adapters (peft) on
    # `target_modules` (those present in the model), plus `modules_to_save` in full.
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "k_down", "k_up", "v_down", "v_up", "kv_down", "k_rope"])
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """One stage of a staged recovery: `steps` optimizer steps training only the `train` parameters."""
    steps: int = 1
    # new: the parameters surgery created or changed (low-rank down/up projections, merged-head K/V and the
    # q/o projections folded with them, ...); new+lora: those and the LoRA adapters (training.lora.r > 0);
    # all: every parameter (with LoRA: the base weights too).
    train: str = "all"
    # This stage's peak learning rate; training.lr when unset. A stage of new parameters alone can take a higher
    # one than the pretrained weights tolerate when everything trains.
    lr: Optional[float] = None


@dataclass
class TrainingConfig:
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    # The policy with gradient_checkpointing: recompute one decoder layer in N in the backward (1: every layer, the
    # least memory; 2: every other one, about half the activations kept for half the recompute; ...). The layers in
    # between keep their activations. Memory against speed, per model and batch.
    gradient_checkpointing_every: int = 1
    # torch.compile the student (through its DeepSpeed engine) and the teacher, in place: parameter names and
    # checkpoints are unchanged, the losses equal eager ones to float rounding (tests/trainer/test_reliability.py).
    # The first steps pay the compilation; whether it pays after that is measured per model and device.
    compile: bool = False
    # What training.compile compiles. model: the whole forward of student and teacher (SmolLM2 recipes on an H200:
    # 139k tokens/s against 100k eager, but ~290 s of compiling before the first steps, more than a 400-step run
    # trains). layers: each decoder layer on its own (torchtitan's per-block compile): layers of one kind share one
    # compiled graph, so compiling costs a few graphs instead of the whole unrolled model; embedding, final norm and
    # loss stay eager (the loss has its own fused kernel).
    compile_scope: str = "model"
    # Distillation from the original (uncompressed) model: loss = (1 - w) * CE + w * T^2 * KL(teacher || student).
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    # The frozen teacher's dtype. auto: the training precision's (bf16 for bf16, ...), as the student computes. With
    # a float32 teacher, distillation ran at 35.8k tokens/s on an H200 against cross-entropy's 122k on the same data
    # (docs/results/recovery-h200/); the bf16 teacher's rate is not measured yet.
    teacher_dtype: str = "auto"
    # hidden: the loss from the final hidden states, a chunk of positions at a time (trainer/losses.py), so the
    # [B, L, V] logits are never held; logits: from the full logits. auto: hidden when distilling (faster and
    # smaller there), logits for cross-entropy alone (faster; hidden saves memory). Measured: docs/TRAINING.md.
    # A wrapped (LoRA) output head always uses logits; under ZeRO-3 the hidden path gathers the head's weight itself.
    loss_from: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Staged recovery, e.g. [{steps: 100, train: new}, {steps: 400, train: all}]; the steps add up to max_steps.
    # Each stage gets a fresh optimizer and its own warmup + decay schedule (trainer/train.py, "Stages").
    # Empty: one stage, every parameter LoRA or full finetuning leaves trainable.
    stages: list[StageConfig] = field(default_factory=list)
    eval_every: int = 50
    # Each eval scores eval_batches x eval.batch_size rows in total, split over the ranks (the same rows on any
    # number of GPUs).
    eval_batches: int = 8
    log_every: int = 1
    # A step whose loss or gradients are not finite is skipped (no weight or optimizer-state update);
    # this many skipped steps in a row stop the run with a checkpoint (see README, Reliability).
    max_bad_steps: int = 5


@dataclass
class DeepSpeedConfig:
    # An inline DeepSpeed config (dict, merged over the built-in default below) or the path to a JSON file (used
    # as it is). Values set to "auto" are filled from `training`, so the two can never disagree. None means the
    # built-in default.
    config: Any = None
    # Shortcuts that override the DeepSpeed config when set.
    zero_stage: Optional[int] = None
    offload_optimizer: bool = False
    offload_param: bool = False
    # ZeRO-1/2's inf/NaN check and gradient norm before each step over all gradient tensors at once
    # (trainer/zero_checks.py) instead of a dozen kernel launches per tensor; self-checked against DeepSpeed's own.
    # false: DeepSpeed's methods as they are.
    fused_gradient_checks: bool = True


@dataclass
class LoggingConfig:
    # auto: online when WANDB_API_KEY is set (or `wandb login` was run), offline otherwise.
    wandb: str = "auto"
    project: str = "kvforge"
    entity: Optional[str] = None


@dataclass
class CheckpointConfig:
    save_every: int = 50
    keep_last: int = 2
    # auto: continue from the newest complete checkpoint in the run directory if there is one;
    # never: start fresh (refuses to overwrite an existing run's checkpoints); or a checkpoint path.
    resume: str = "auto"
    # Write a consolidated Hugging Face model directory (safetensors) when the run finishes.
    export_hf: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 4
    # Evaluate before the first step too, so a run's log shows where it started.
    at_start: bool = True
    # Held-out sources, never trained on (e.g. general prose when training on teacher samples): each source's
    # eval split (heldout_fraction of its documents, split seed 0, data.seq_len rows, at most
    # training.eval_batches x batch_size rows) is scored at every eval, logged as eval/heldout/<i>/perplexity;
    # the same rows `launch/evaluate.py --data <source> --eval-fraction <heldout_fraction> --seq-len <seq_len>`
    # scores, so an export can be checked against its run.
    heldout: list[str] = field(default_factory=list)
    heldout_fraction: float = 0.1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The compression section, parsed once here into a CompressionConfig (models/surgery/compression_config.py:
    # its keys, its one budget); None (an empty or absent section) = train the model as it is.
    compression: Optional[CompressionConfig] = None
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


STAGE_TRAIN = ("new", "new+lora", "all")

CHOICES = {
    "model.init": ("pretrained", "random"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "training.schedule": ("cosine", "linear", "constant"),
    "training.precision": ("bf16", "fp16", "fp32"),
    "training.loss_from": ("auto", "hidden", "logits"),
    "training.compile_scope": ("model", "layers"),
    "training.teacher_dtype": ("auto", "float32", "bfloat16", "float16"),
    "logging.wandb": ("auto", "online", "offline", "disabled"),
}
ZERO_STAGES = (0, 1, 2, 3)

# The built-in DeepSpeed config: every batch/optimisation number comes from `training`.
DEFAULT_DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


# ---------------------------------------------------------------------------------------------------
# Loading


def _file_layers(path: Path, seen: tuple[Path, ...]) -> list[DictConfig]:
    """The YAML at `path`, after the files it names as `base:` (a path relative to it): recipes that differ in
    one section share the rest. A mapping merges key by key into its base; a list or value replaces it."""
    if not path.is_file():
        where = f" (the base of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file '{path}'{where} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' is its own base: {' -> '.join(map(str, [*seen, path]))}")
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in many types
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top, got {type(file_cfg).__name__}")
    base = file_cfg.pop("base", None)
    if base is not None and not isinstance(base, str):
        _fail("base", base, f"the path of a config file, relative to {path}")
    _check_keys(OmegaConf.to_container(file_cfg), Config, "", source=f"in {path}")
    layers = [] if base is None else _file_layers(path.parent / base, (*seen, path.resolve()))
    return [*layers, file_cfg]


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML at `path` <- dotlist `overrides`; validated; returns a plain `Config`.

    Raises:
        ConfigError: for an unreadable file, an unknown key, a wrong type, an out-of-range value or
            an impossible combination.
    """
    layers = [] if path is None else _file_layers(Path(path), ())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        try:
            dot_cfg = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}' could not be parsed: {e}") from None
        _check_keys(OmegaConf.to_container(dot_cfg), Config, "", source=f"in override '{item}'")
        layers.append(dot_cfg)

    try:
        merged = OmegaConf.merge(_tree(Config(), compression=None), *layers)
        resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain_omegaconf_error(e)) from None
    except TypeError as e:  # OmegaConf: a dotlist index into a list ("a.layers.1.x=...") cannot merge
        raise ConfigError(f"an override addresses a list element by index, which cannot be merged ({e}); "
                          "replace the whole list instead, e.g. compression.layers='[{...}, ...]', "
                          "or edit the YAML file") from None
    cfg = _build(Config, resolved)
    validate(cfg)
    return cfg


def _check_keys(user: Any, schema: type, prefix: str, source: str) -> None:
    """Unknown keys are errors, with the closest known key suggested."""
    if not isinstance(user, dict):
        return
    hints = get_type_hints(schema)
    known = [f.name for f in fields(schema)]
    for key, value in user.items():
        path = f"{prefix}{key}"
        if key not in known:
            hint = did_you_mean(key, known, prefix=prefix) or f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key '{path}' {source}{hint}")
        sub = hints[key]
        if is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' {source} must be a section (mapping), got {value!r}")
            _check_keys(value, sub, path + ".", source)
        elif _section_list(sub) is not None:
            _check_section_list(value, _section_list(sub), path, source)
        else:
            _check_leaf_type(value, sub, path, source)


def _section_list(hint: Any) -> Optional[type]:
    """The section type of a list of sections (training.stages: list[StageConfig]), else None."""
    if get_origin(hint) is list and get_args(hint) and is_dataclass(get_args(hint)[0]):
        return get_args(hint)[0]
    return None


def _check_section_list(value: Any, section: type, path: str, source: str) -> None:
    """A list of sections: each entry a mapping with known keys of leaf types (errors name the list key and the
    entry, e.g. 'training.stages' entry 1)."""
    known = [f.name for f in fields(section)]
    example = "[{" + ", ".join(f"{name}: ..." for name in known) + "}, ...]"
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return
    if not isinstance(value, list):
        raise ConfigError(f"config key '{path}' {source} = {value!r}: expected a list of mappings, e.g. {example}")
    hints = get_type_hints(section)
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise ConfigError(f"config key '{path}' {source}: entry {i} = {entry!r}: expected a mapping, e.g. {example}")
        for key, sub_value in entry.items():
            if key not in known:
                raise ConfigError(f"config key '{path}' {source}: entry {i} has the unknown key {key!r} (known keys: "
                                  f"{', '.join(known)}){did_you_mean(key, known)}")
            # OmegaConf would report a bad value here by the field's name alone ('steps'), not by the list key.
            expected = {int: "an integer", str: "a string"}.get(hints[key])
            if expected and (isinstance(sub_value, bool) or not isinstance(sub_value, hints[key])):
                raise ConfigError(f"config key '{path}' {source}: entry {i} has {key} = {sub_value!r}: expected "
                                  f"{expected}")


def _check_leaf_type(value: Any, hint: Any, path: str, source: str) -> None:
    """The type checks OmegaConf leaves out: it turns any number into a bool, and takes nested lists or
    mappings as list[str] elements. Strings that are interpolations (`${...}`) are resolved later."""
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{path}' {source} = {value!r}: expected true or false")
    if get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' {source} = {value!r}: expected a list, e.g. [a, b]")
        bad = [v for v in value if isinstance(v, (list, dict)) or v is None]
        if bad:
            raise ConfigError(f"config key '{path}' {source} = {value!r}: expected a list of names, got {bad[0]!r} "
                              "in it")
    if get_origin(hint) is dict and not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' {source} = {value!r}: expected a mapping")


def _explain_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).split("\n")[0]
    if "Incompatible value 'None'" in msg:
        expected = msg.rsplit("of type", 1)[-1].strip(" '")
        return f"config key '{key}' is empty (null); expected a {expected}"
    if "could not be converted" in msg or "Value '" in msg:
        return f"config key '{key}': {msg}"
    if "Missing mandatory value" in msg:
        return f"config key '{key}' is required but was not set"
    return f"config key '{key}': {msg}"


COMPRESSION_ERRORS = (SurgeryError, CompressionSpecError, PresetError, PyramidError)


def _compression(section: Any) -> Optional[CompressionConfig]:
    """The one parse of the compression section (its errors name the key path: 'compression.surgery.x: ...')."""
    if section is None or section == {}:
        return None
    try:
        return CompressionConfig.from_section(section)
    except COMPRESSION_ERRORS as e:
        raise ConfigError(str(e)) from None


def _build(cls: type, values: dict) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        v = values[f.name]
        if f.name == "compression" and cls is Config:
            v = _compression(v)
        elif is_dataclass(hints[f.name]):
            v = _build(hints[f.name], v)
        elif _section_list(hints[f.name]) is not None:
            v = [_build(_section_list(hints[f.name]), entry) for entry in v]
        kwargs[f.name] = v
    return cls(**kwargs)


def _tree(cfg: Config, compression: Any = "as written") -> DictConfig:
    """`cfg` as an OmegaConf tree: each section typed (structured), `compression` the mapping as written (OmegaConf
    cannot hold a CompressionConfig; `_build` parses it from that mapping). The schema files merge into is
    `_tree(Config(), compression=None)`: an untyped slot that takes whatever a file gives, for the parse to judge."""
    if compression == "as written":
        compression = cfg.compression.to_dict() if cfg.compression else {}
    return OmegaConf.create({f.name: compression if f.name == "compression" else OmegaConf.structured(getattr(cfg, f.name))
                             for f in fields(cfg)})


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(_tree(cfg), resolve=True)


def save_resolved(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a half-written config is never read back)."""
    atomic.write_text(path, OmegaConf.to_yaml(_tree(cfg)))


# ---------------------------------------------------------------------------------------------------
# Validation: values, ranges and combinations


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def validate(cfg: Config) -> None:
    """Range and combination checks; raises ConfigError naming the key, the value and what is allowed."""
    # NaN passes every `x < 0` check below, so numbers are checked for being finite first.
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            _fail(key, value, "a finite number")
        if isinstance(value, int) and not -2**63 <= value < 2**63:
            _fail(key, value, "an integer that fits in 64 bits")
    for key in ("run.name", "run.output_dir", "data.text_field", "data.split", "logging.project"):
        section, name = key.split(".")
        if not str(getattr(getattr(cfg, section), name)).strip():
            _fail(key, getattr(getattr(cfg, section), name), "a non-empty string")
    if not 0 <= cfg.run.seed < 2**63:
        _fail("run.seed", cfg.run.seed, "an integer in [0, 2**63)")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            _fail(key, value, f"one of {', '.join(allowed)}{did_you_mean(value, allowed, paren=True)}")

    t = cfg.training
    positive = {
        "training.max_steps": t.max_steps,
        "training.micro_batch_size": t.micro_batch_size,
        "training.grad_accum": t.grad_accum,
        "training.log_every": t.log_every,
        "training.eval_batches": t.eval_batches,
        "data.seq_len": cfg.data.seq_len,
        "eval.batch_size": cfg.eval.batch_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "training.max_bad_steps": t.max_bad_steps,
        "training.gradient_checkpointing_every": t.gradient_checkpointing_every,
    }
    for key, value in positive.items():
        if value <= 0:
            _fail(key, value, "a positive integer")
    for key, value in {"training.eval_every": t.eval_every, "checkpoint.save_every": cfg.checkpoint.save_every,
                       "training.warmup_steps": t.warmup_steps}.items():
        if value < 0:
            _fail(key, value, "an integer >= 0 (0 disables it)")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        _fail("training.lr", t.lr, "a positive finite learning rate")
    if not 0 <= t.min_lr_ratio <= 1:
        _fail("training.min_lr_ratio", t.min_lr_ratio, "a fraction in [0, 1]")
    for key, value in {"training.beta1": t.beta1, "training.beta2": t.beta2}.items():
        if not 0 <= value < 1:
            _fail(key, value, "a number in [0, 1)")
    if t.eps <= 0:
        _fail("training.eps", t.eps, "a small positive number (Adam's epsilon)")
    if t.lora.alpha <= 0:
        _fail("training.lora.alpha", t.lora.alpha, "a positive scale (LoRA's alpha)")
    if t.grad_clip < 0:
        _fail("training.grad_clip", t.grad_clip, "a number >= 0 (0 disables clipping)")
    if not 0 <= t.distill_weight <= 1:
        _fail("training.distill_weight", t.distill_weight, "a weight in [0, 1] (0: cross-entropy only)")
    if t.distill_temperature <= 0:
        _fail("training.distill_temperature", t.distill_temperature, "a positive temperature")
    if t.lora.r < 0:
        _fail("training.lora.r", t.lora.r, "a rank >= 0 (0: full finetuning)")
    if t.lora.r and not t.lora.target_modules:
        _fail("training.lora.target_modules", t.lora.target_modules, "at least one module name when lora.r > 0")
    if not 0 <= t.lora.dropout < 1:
        _fail("training.lora.dropout", t.lora.dropout, "a probability in [0, 1)")
    if t.weight_decay < 0:
        _fail("training.weight_decay", t.weight_decay, "a number >= 0")
    if t.warmup_steps > t.max_steps:
        _fail("training.warmup_steps", t.warmup_steps, f"at most training.max_steps ({t.max_steps})")
    _validate_stages(cfg)
    _validate_heldout(cfg)
    if not 0 < cfg.data.eval_fraction < 1:
        _fail("data.eval_fraction", cfg.data.eval_fraction, "a fraction strictly between 0 and 1")
    if cfg.data.max_documents is not None and cfg.data.max_documents < 2:
        _fail("data.max_documents", cfg.data.max_documents, "at least 2 (one for train, one for eval) or null")
    if not cfg.model.name:
        _fail("model.name", cfg.model.name, "a hub id, a local directory, a .gguf file or 'smollm2-135m-instruct'")
    if not isinstance(cfg.model.config, dict):
        _fail("model.config", cfg.model.config, "a mapping of model config overrides")
    if cfg.model.config and cfg.model.init == "pretrained":
        raise ConfigError(
            "config key 'model.config' overrides the architecture, which only makes sense with model.init=random "
            f"(got model.init='pretrained' and model.config={cfg.model.config!r})"
        )
    # The data source must exist when it is a path; hub names are checked when the data is loaded.
    src = cfg.data.source
    if not src:
        _fail("data.source", src, "python-docs, stdlib-docstrings, a local file/folder or a dataset name")
    if _looks_like_path(src) and not Path(src).expanduser().exists():
        raise ConfigError(f"config key 'data.source' = {src!r}: the path does not exist")
    _validate_data_sources(cfg)
    if _looks_like_path(cfg.model.name) and not Path(cfg.model.name).expanduser().exists():
        raise ConfigError(f"config key 'model.name' = {cfg.model.name!r}: the path does not exist")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        _fail("checkpoint.resume", resume, "auto, never, or the path of a checkpoint directory (run_dir/"
              "checkpoints/step_N); that path is not a directory")
    resolve_deepspeed(cfg, world_size=1)  # raises for an invalid DeepSpeed section


def _validate_heldout(cfg: Config) -> None:
    """eval.heldout: sources the run does not train on (a held-out source in the training data measures
    memorisation), and a heldout_fraction strictly between 0 and 1."""
    e = cfg.eval
    if not 0 < e.heldout_fraction < 1:
        _fail("eval.heldout_fraction", e.heldout_fraction, "a fraction strictly between 0 and 1")
    trained = {cfg.data.source, *(entry.source for entry in cfg.data.mix)} - {None}
    for i, source in enumerate(e.heldout):
        if source in trained or source == TEACHER_SAMPLES:
            _fail(f"eval.heldout[{i}]", source, f"a source the run does not train on (training reads "
                  f"{sorted(trained)})")


def _validate_stages(cfg: Config) -> None:
    """training.stages: positive steps adding up to max_steps, a known `train` set that the run has (`new` needs a
    compression section, `new+lora` LoRA), and room for the warmup in every stage (each restarts it)."""
    t = cfg.training
    for i, stage in enumerate(t.stages):
        key = f"training.stages[{i}]"
        if isinstance(stage.steps, bool) or not isinstance(stage.steps, int) or not 0 < stage.steps < 2**63:
            _fail(f"{key}.steps", stage.steps, "a positive number of optimizer steps")
        if stage.lr is not None and (isinstance(stage.lr, bool) or not isinstance(stage.lr, (int, float))
                                     or not 0 < stage.lr < float("inf")):
            _fail(f"{key}.lr", stage.lr, "a positive learning rate, or no key for training.lr")
        if stage.train not in STAGE_TRAIN:
            _fail(f"{key}.train", stage.train,
                  f"one of {', '.join(STAGE_TRAIN)}{did_you_mean(stage.train, STAGE_TRAIN, paren=True)}")
        if stage.train != "all" and not cfg.compression:
            _fail(f"{key}.train", stage.train, "'all' without a compression section (no parameter is new: surgery "
                  "creates them)")
        if stage.train == "new+lora" and not t.lora.r:
            _fail(f"{key}.train", stage.train, "'new' or 'all' when training.lora.r = 0 (there are no adapters)")
        if t.warmup_steps > stage.steps:
            _fail("training.warmup_steps", t.warmup_steps,
                  f"at most the steps of every stage ({key}.steps = {stage.steps}): each stage warms up again")
    total = sum(stage.steps for stage in t.stages)
    if t.stages and total != t.max_steps:
        _fail("training.stages", [f"{s.steps} x {s.train}" for s in t.stages],
              f"steps adding up to training.max_steps ({t.max_steps}), not {total}")


TEACHER_SAMPLES = "teacher-samples"  # the source name of text sampled from the original model (trainer/data.py)


def check_teacher_samples(ts: TeacherSamplesConfig, seq_len: int) -> None:
    """The teacher-samples settings (also called by trainer/data.py for settings given as a mapping).

    Raises:
        ConfigError: naming the key 'data.teacher_samples.<name>', the value and what is allowed.
    """
    if ts.tokens < 1:
        _fail("data.teacher_samples.tokens", ts.tokens, "a positive number of tokens to sample")
    if ts.sample_len is not None and not 2 <= ts.sample_len <= seq_len:
        _fail("data.teacher_samples.sample_len", ts.sample_len,
              f"null (= data.seq_len) or an integer in [2, data.seq_len={seq_len}]")
    for name in ("temperature_min", "temperature_max"):
        if not getattr(ts, name) > 0:
            _fail(f"data.teacher_samples.{name}", getattr(ts, name), "a temperature > 0")
    if ts.temperature_min > ts.temperature_max:
        raise ConfigError(f"config keys 'data.teacher_samples.temperature_min' = {ts.temperature_min!r} and "
                          f"'data.teacher_samples.temperature_max' = {ts.temperature_max!r}: expected min <= max "
                          "(each sample's temperature is drawn between them)")
    if not 0 < ts.top_p <= 1:
        _fail("data.teacher_samples.top_p", ts.top_p, "a probability in (0, 1] (1 disables nucleus sampling)")
    if not 0 <= ts.seed < 2**63:
        _fail("data.teacher_samples.seed", ts.seed, "an integer in [0, 2**63)")
    if ts.batch_size < 1:
        _fail("data.teacher_samples.batch_size", ts.batch_size, "a positive number of samples per generate() call")
    if ts.dtype not in ("auto", "bfloat16", "float16", "float32"):
        _fail("data.teacher_samples.dtype", ts.dtype, "one of auto, bfloat16, float16, float32")
    if ts.engine not in ("auto", "static", "generate"):
        _fail("data.teacher_samples.engine", ts.engine, "one of auto, static, generate")
    if ts.attention not in ("auto", "triton", "matmul", "sdpa"):
        _fail("data.teacher_samples.attention", ts.attention, "one of auto, triton, matmul, sdpa")
    if not 0 <= ts.prefix_fraction <= 1:
        _fail("data.teacher_samples.prefix_fraction", ts.prefix_fraction, "a fraction in [0, 1]")
    if not 0 <= ts.instruction_fraction <= 1 - ts.prefix_fraction:
        _fail("data.teacher_samples.instruction_fraction", ts.instruction_fraction,
              f"a fraction in [0, 1 - prefix_fraction = {1 - ts.prefix_fraction:g}] (a sample is prefixed, "
              "instructed or neither)")
    if ts.instructions is not None and not Path(ts.instructions).expanduser().is_file():
        _fail("data.teacher_samples.instructions", ts.instructions,
              "a text file of one instruction per line, or null for the built-in ones")
    sample_len = ts.sample_len or seq_len
    if ts.prefix_tokens < 1 or (ts.prefix_fraction > 0 and ts.prefix_tokens > sample_len - 2):
        _fail("data.teacher_samples.prefix_tokens", ts.prefix_tokens,
              f"an integer in [1, sample_len - 2 = {sample_len - 2}] (a sample must leave room to generate; "
              "'data.teacher_samples.sample_len' defaults to 'data.seq_len')")
    if ts.prefix_fraction > 0 and not ts.prefix_source:
        _fail("data.teacher_samples.prefix_source", ts.prefix_source, "a real-text source (e.g. python-docs) when "
              f"'data.teacher_samples.prefix_fraction' = {ts.prefix_fraction} > 0")
    if ts.prefix_source == TEACHER_SAMPLES:
        _fail("data.teacher_samples.prefix_source", ts.prefix_source, "a source of real text, not teacher-samples")
    if ts.prefix_source and _looks_like_path(ts.prefix_source) and not Path(ts.prefix_source).expanduser().exists():
        raise ConfigError(f"config key 'data.teacher_samples.prefix_source' = {ts.prefix_source!r}: the path "
                          "does not exist")


def _validate_data_sources(cfg: Config) -> None:
    """data.mix, data.teacher_samples and where they can be used (checked even when no source uses them,
    so a typo never waits for the day it matters)."""
    d, ts = cfg.data, cfg.data.teacher_samples
    if len(d.mix) == 1:
        _fail("data.mix", [vars(e) for e in d.mix], "at least 2 entries (for one source set data.source instead)")
    seen = set()
    for i, entry in enumerate(d.mix):
        key = f"data.mix[{i}]"
        if not entry.source or not entry.source.strip():
            _fail(f"{key}.source", entry.source, "python-docs, stdlib-docstrings, teacher-samples, a local "
                  "file/folder or a dataset name")
        if entry.source in seen:
            _fail(f"{key}.source", entry.source, "a source not already in data.mix (merge the weights)")
        seen.add(entry.source)
        if _looks_like_path(entry.source) and not Path(entry.source).expanduser().exists():
            raise ConfigError(f"config key '{key}.source' = {entry.source!r}: the path does not exist")
        if isinstance(entry.weight, bool) or not (math.isfinite(entry.weight) and entry.weight > 0):
            _fail(f"{key}.weight", entry.weight, "a positive finite share (weights are normalised to sum to 1)")

    check_teacher_samples(ts, d.seq_len)
    # Calibration statistics are taken from real text: surgery reads compression.calibration.source, else
    # data.source, and teacher samples do not exist yet when surgery runs.
    if cfg.compression and d.source == TEACHER_SAMPLES and not cfg.compression.calibration.source:
        raise ConfigError("config key 'compression.calibration.source' is not set, so calibration would read "
                          "data.source = 'teacher-samples', which surgery cannot: set it to real text, e.g. "
                          "compression.calibration.source=python-docs")


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of the config tree (not inside free-form mappings)."""
    out = []
    for f in fields(node):
        value = getattr(node, f.name)
        if isinstance(value, CompressionConfig):
            continue  # checked by its own parse, which names its keys as the YAML has them
        if is_dataclass(value):
            out.extend(_leaves(value, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", value))
    return out


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.endswith((".gguf", ".jsonl", ".json", ".txt", ".parquet"))


# ---------------------------------------------------------------------------------------------------
# DeepSpeed: one config, with "auto" filled from `training`


def _merged(base: dict, override: dict) -> dict:
    """`override` deep-merged into `base` (mappings key by key, anything else replaced)."""
    for key, value in override.items():
        base[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def resolve_deepspeed(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict with every "auto" filled from `cfg.training`.

    Raises:
        ConfigError: unreadable JSON, an unsupported ZeRO stage, or a value that contradicts `training`.
    """
    d = cfg.deepspeed
    if d.config is None:
        ds = json.loads(json.dumps(DEFAULT_DEEPSPEED))
    elif isinstance(d.config, str):
        p = Path(d.config).expanduser()
        if not p.is_file():
            raise ConfigError(f"config key 'deepspeed.config' = {d.config!r}: the JSON file does not exist")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key 'deepspeed.config' = {d.config!r}: not valid JSON ({e})") from None
    elif isinstance(d.config, dict):
        # Merged over the built-in default, so `deepspeed.config.zero_optimization.<key>=...` adds one setting
        # instead of silently dropping the rest (steps_per_print: DeepSpeed would then print every 10 steps).
        ds = _merged(json.loads(json.dumps(DEFAULT_DEEPSPEED)), json.loads(json.dumps(d.config)))
    else:
        _fail("deepspeed.config", d.config, "a mapping (inline DeepSpeed config) or the path to a JSON file")
    if not isinstance(ds, dict):
        _fail("deepspeed.config", ds, "a JSON object (mapping) at the top")
    for section in ("zero_optimization", "bf16", "fp16", "optimizer"):
        if section in ds and not isinstance(ds[section], dict):
            _fail(f"deepspeed.config.{section}", ds[section], "a mapping (section)")
    if "optimizer" in ds and not isinstance(ds["optimizer"].get("params", {}), dict):
        _fail("deepspeed.config.optimizer.params", ds["optimizer"]["params"], "a mapping")
    # Skipping a step whose gradients are not finite goes through the optimizer's overflow check
    # (trainer/train.py); with bf16 DeepSpeed lets a config turn that check off.
    if ds.get("bf16", {}).get("check_grad_overflow", True) is not True:
        _fail("deepspeed.config.bf16.check_grad_overflow", ds["bf16"]["check_grad_overflow"],
              "true (kvforge skips steps with non-finite gradients through it; remove the key)")

    t = cfg.training
    zero = ds.setdefault("zero_optimization", {})
    if d.zero_stage is not None:
        zero["stage"] = d.zero_stage
    stage = zero.setdefault("stage", 0)
    if stage not in ZERO_STAGES:
        key = "deepspeed.zero_stage" if d.zero_stage is not None else "deepspeed.config.zero_optimization.stage"
        _fail(key, stage, "a ZeRO stage in 0, 1, 2, 3")
    if d.offload_optimizer:
        if stage == 0:
            _fail("deepspeed.offload_optimizer", True, "ZeRO stage >= 1 (optimizer offload needs ZeRO)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if d.offload_param:
        if stage != 3:
            _fail("deepspeed.offload_param", True, "ZeRO stage 3 (parameter offload needs stage 3)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)

    precision = t.precision
    expected = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in expected.items():
        ds[key] = _fill_auto(ds, key, value, f"training ({value})")
    if "train_batch_size" in ds:
        ds["train_batch_size"] = _fill_auto(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size,
                                            "micro_batch_size x grad_accum x world_size")
    for name, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = ds.setdefault(name, {})
        section["enabled"] = _fill_auto(section, "enabled", on, f"training.precision ({precision})",
                                        key_path=f"deepspeed.config.{name}.enabled")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                           "weight_decay": t.weight_decay}.items():
            params[key] = _fill_auto(params, key, value, f"training ({value})",
                                     key_path=f"deepspeed.config.optimizer.params.{key}")
    if "scheduler" in ds:
        raise ConfigError("config key 'deepspeed.config.scheduler' is not used: the learning-rate schedule comes "
                          "from training.schedule / warmup_steps / min_lr_ratio; remove the scheduler section")
    return ds


def check_deepspeed_config(ds: dict) -> None:
    """Let DeepSpeed parse the resolved config now, and refuse the keys it would silently ignore.

    DeepSpeed validates its sections (zero_optimization, bf16, ...) strictly, but reads top-level keys
    one by one with defaults, so `zero_optimisation` or `gradient_acumulation_steps` would be dropped
    without a word. The keys it reads are recorded; any other key is an error ("did you mean").
    Imports DeepSpeed, so it runs in the trainer, not in `load_config`.

    Raises:
        ConfigError: naming the unknown key or the section DeepSpeed rejects.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    class RecordingDict(dict):
        # copy.copy (which DeepSpeed applies) shares `read` with the copy.
        def __init__(self, *args):
            super().__init__(*args)
            self.read: set = set()

        def get(self, key, *default):
            self.read.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

    recorded = RecordingDict(ds)
    try:
        DeepSpeedConfig(recorded)
    except (ValueError, TypeError, KeyError, AssertionError) as e:  # pydantic's ValidationError is a ValueError
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ConfigError(f"config key 'deepspeed.config' is rejected by DeepSpeed: {'; '.join(lines[:3])}") from None
    for key in sorted(set(ds) - recorded.read):
        hint = did_you_mean(key, sorted(recorded.read), prefix="deepspeed.config.")
        raise ConfigError(f"unknown config key 'deepspeed.config.{key}': DeepSpeed would ignore it{hint}")


def _fill_auto(section: dict, key: str, value: Any, source: str, key_path: Optional[str] = None) -> Any:
    current = section.get(key, "auto")
    if current == "auto":
        return value
    if current != value:
        raise ConfigError(
            f"config key '{key_path or 'deepspeed.config.' + key}' = {current!r} contradicts {source}: "
            f"set it to \"auto\" (or to {value!r})"
        )
    return current


def parse_cli_overrides(items: list[str]) -> list[str]:
    """Accept `key=value` and `--key=value` forms on the command line."""
    return [item[2:] if item.startswith("--") else item for item in items]


__all__ = [
    "Config", "ConfigError", "load_config", "validate", "resolve_deepspeed", "check_deepspeed_config",
    "save_resolved", "to_dict", "parse_cli_overrides", "RunConfig", "ModelConfig", "DataConfig", "TrainingConfig",
    "DeepSpeedConfig", "LoggingConfig", "CheckpointConfig", "EvalConfig", "LoraConfig", "StageConfig",
    "CompressionConfig",
]
