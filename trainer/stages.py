"""Staged recovery (`training.stages`): which parameters each stage trains and the DeepSpeed engine that trains
them, started fresh or from the checkpoint that ended the stage before."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .export_run import consolidate_checkpoint
from .runtime import compile_in_place, decoder_layers
from .zero_checks import fuse_gradient_checks

# ZeRO-1/2 pack each optimizer group's parameters back to back in one flat buffer and make every parameter a view
# into it, so a parameter whose 16-bit size is not a multiple of 16 bytes (a latent projection's bias with a greedy
# rank, e.g. 37 values) shifts every later one off 16-byte alignment. torch.compile per decoder layer compiles the
# first layers' graph from their (aligned) parameters, treats parameters as static inputs whose alignment it never
# checks again, and runs the later layers' misaligned ones through kernels that assume alignment: "CUDA driver error:
# misaligned address" in the first compiled step (session 14; the first crashes surfaced as
# CUBLAS_STATUS_EXECUTION_FAILED). Such a parameter gets an optimizer group, hence a flat buffer, of its own.
ALIGN_ELEMENTS = 8  # 16 bytes of a 16-bit parameter


def param_groups(model: torch.nn.Module, weight_decay: float | None = None) -> list[dict]:
    """The trainable parameters as optimizer groups: no weight decay on norms, biases and embeddings (the usual GPT
    recipe; `weight_decay` None: groups without the key, for an optimizer that DeepSpeed's config defines), and each
    parameter whose size is not a multiple of ALIGN_ELEMENTS in a group of its own (see above)."""
    decay, no_decay, unaligned = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "embed" in name or "norm" in name)
        if p.numel() % ALIGN_ELEMENTS:
            unaligned.append(([p], decays))
        else:
            (decay if decays else no_decay).append(p)
    groups = [(decay, True), (no_decay, False), *unaligned]
    if weight_decay is None:
        return [{"params": params} for params, _ in groups if params]
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0} for params, decays in groups if params]


def optimizer_layout(model: torch.nn.Module) -> list[list[str]]:
    """The names of param_groups' groups, in order: what a checkpoint's optimizer state is laid out by (ZeRO keeps
    one flat buffer per group), so a resume can tell a layout it cannot load before DeepSpeed tries."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model)]


def checkpoint_layers(model: torch.nn.Module, every: int) -> list[int]:
    """Gradient checkpointing of one decoder layer in `every` (layers 0, every, 2 * every, ...): transformers'
    checkpointing switched on for the model, then off again in the layers between (each of its
    GradientCheckpointingLayers reads its own flag at every call). Returns the checkpointed layers' indices."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    return [index for index in range(len(layers)) if index % every == 0]


def misaligned_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters whose storage does not start on a 16-byte boundary."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.data_ptr() % 16]


# Each stage trains its own set of parameters, with its own optimizer and schedule, on its own DeepSpeed engine:
# the set has requires_grad=True and every other parameter False before deepspeed.initialize. That is how
# DeepSpeed supports frozen parameters under every ZeRO stage: ZeRO-1/2 build their flat fp32 master
# partitions and gradient buckets, and ZeRO-3 its partitioned optimizer groups, from the parameters that
# require gradients when the engine is built, and cannot take one in or out later (a parameter frozen
# afterwards stays in the flat buffers, where weight decay and Adam's momentum keep moving it). Zeroing a
# group's learning rate instead would still compute the frozen gradients, count them in the clipping norm, and
# carry stage 1's Adam moments into stage 2.
#
# At a boundary the run saves a checkpoint with the finished stage's engine, drops that engine, builds the model
# again, loads the checkpoint's weights (ZeRO's fp32 master weights where it keeps them) and builds the next
# stage's engine with a fresh optimizer. A run resumed from that checkpoint takes the same path, so it continues
# as the uninterrupted run did; a checkpoint inside a stage is loaded whole (optimizer state too) into an engine
# of its stage. Under bf16/fp16, DeepSpeed makes the new engine's fp32 master weights from the module's 16-bit
# ones, so they are rounded once at each boundary, as at the start of every run.


@dataclass(frozen=True)
class Stage:
    index: int     # 0-based
    start: int     # optimizer steps done before the stage
    steps: int
    train: str     # new | new+lora | all; "default" without training.stages (what LoRA or full finetuning trains)
    lr: float      # peak learning rate

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(cfg: Config) -> list[Stage]:
    """training.stages as consecutive step ranges; without them one stage over max_steps."""
    if not cfg.training.stages:
        return [Stage(0, 0, cfg.training.max_steps, "default", cfg.training.lr)]
    stages, start = [], 0
    for i, stage in enumerate(cfg.training.stages):
        stages.append(Stage(i, start, stage.steps, stage.train, cfg.training.lr if stage.lr is None else stage.lr))
        start += stage.steps
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs optimizer step `step` + 1 (the last stage from its end on)."""
    return next((stage for stage in stages if step < stage.end), stages[-1])


def select_trainable(model: torch.nn.Module, stage: Stage, new: set[str]) -> list[str]:
    """Set requires_grad for `stage` on a freshly built model (LoRA-wrapped or not); returns the trained names.

    `new` holds the names surgery created or changed, as in the compressed model. Under peft a wrapped module's
    weight is `base_model.model.<name minus .weight>.base_layer.weight`, and right after wrapping exactly the
    adapters (and `modules_to_save` copies) require gradients: that is what `lora` adds in `new+lora`. peft's
    `original_module` copies are never trained (the forward uses the `modules_to_save` copy).

    Raises:
        ConfigError: the stage would train no parameter (say `new` with a spec that changes nothing).
    """
    if stage.train == "default":
        return [name for name, p in model.named_parameters() if p.requires_grad]
    adapters = {name for name, p in model.named_parameters() if p.requires_grad} if hasattr(model, "peft_config") \
        else set()
    trained = []
    for name, p in model.named_parameters():
        plain = (name.removeprefix("base_model.model.").replace(".base_layer.", ".")
                 .replace(".modules_to_save.default.", "."))
        on = ".original_module." not in name and (
            stage.train == "all" or plain in new or (stage.train == "new+lora" and name in adapters))
        p.requires_grad_(on)
        if on:
            trained.append(name)
    if not trained:
        raise ConfigError(f"config key 'training.stages[{stage.index}].train' = {stage.train!r} selects no parameter "
                          "of this model (its compression changed none); expected 'all'")
    return trained


def load_weights(model: torch.nn.Module, ckpt_dir: Path, zero_stage: int, rank: int) -> None:
    """Load a checkpoint's weights (not its optimizer state) into a model built for another stage, before its
    engine exists (collective). Under ZeRO-3 the model is partitioned: rank 0 reads the checkpoint and writes each
    parameter while it is gathered.

    Raises:
        CheckpointError: the checkpoint lacks a parameter of the model or has one with another shape.
    """
    import deepspeed

    zero3 = zero_stage == 3
    weights = consolidate_checkpoint(ckpt_dir, zero_stage) if rank == 0 or not zero3 else None
    for name, p in model.named_parameters():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if weights is not None and (name not in weights or tuple(weights[name].shape) != shape):
            found = tuple(weights[name].shape) if name in weights else "nothing"
            raise ckpt.CheckpointError(f"checkpoint {ckpt_dir} holds {found} for parameter {name} of shape {shape}: "
                                       "it is not a checkpoint of this run's model")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else contextlib.nullcontext():
            if weights is not None:
                with torch.no_grad():
                    p.copy_(weights[name])


def start_stage(model: torch.nn.Module, stage: Stage, new: set[str], cfg: Config, ds_config: dict, device,
                log) -> Any:
    """A DeepSpeed engine, with a fresh optimizer, training `stage`'s parameters of the freshly built `model`."""
    import deepspeed

    t = cfg.training
    trained = select_trainable(model, stage, new)
    if cfg.training.stages:
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        log(f"stage {stage.index + 1}/{len(t.stages)}: steps {stage.start + 1}-{stage.end} train {stage.train}: "
            f"{len(trained)} tensors, {numel:,} parameters, peak lr {stage.lr:g}")
    if t.gradient_checkpointing:
        checkpointed = checkpoint_layers(model, t.gradient_checkpointing_every)
        log(f"gradient checkpointing: {len(checkpointed)} of {len(decoder_layers(model))} decoder layers "
            f"(training.gradient_checkpointing_every={t.gradient_checkpointing_every})")
    model.config.use_cache = False
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                      eps=t.eps, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None if optimizer else param_groups(model))
    if cfg.deepspeed.fused_gradient_checks and fuse_gradient_checks(engine.optimizer, log):
        log("gradient checks: ZeRO's inf/NaN test and gradient norm fused over all tensors (trainer/zero_checks.py)")
    if t.compile:
        misaligned = misaligned_parameters(engine.module)
        if misaligned:  # param_groups' layout is what prevents this; a DeepSpeed that packs otherwise would not
            raise RuntimeError(f"training.compile=true: {len(misaligned)} parameters start off a 16-byte boundary "
                               f"in DeepSpeed's buffers ({', '.join(misaligned[:3])}, ...), where compiled kernels "
                               "assume alignment; set training.compile=false")
        compile_in_place(engine.module, t.compile_scope, engine)  # names and checkpoints unchanged
    return engine


def start_stage_from_checkpoint(model: torch.nn.Module, stage: Stage, new: set[str], ckpt_dir: Path, cfg: Config,
                                ds_config: dict, zero_stage: int, rank: int, device, log) -> Any:
    """`start_stage` from the checkpoint that ended the stage before (collective): its weights and this rank's
    RNG state, not its optimizer state, which holds the other stage's parameters."""
    load_weights(model, ckpt_dir, zero_stage, rank)
    engine = start_stage(model, stage, new, cfg, ds_config, device, log)
    ckpt.set_rng_state(torch.load(ckpt_dir / f"rng_rank{rank}.pt", weights_only=False))
    return engine
