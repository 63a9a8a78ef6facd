"""The training loop: one file, read top to bottom.

    config -> ranks -> model (+ compression) -> packed data -> DeepSpeed engine of the stage -> resume?
      -> for step: lr(step); grad_accum x (micro batch -> loss -> backward); engine.step()
         log / eval / checkpoint; at a stage boundary: checkpoint -> the next stage's engine
      -> final checkpoint -> consolidated Hugging Face directory -> final eval

Ranks come from the environment (the deepspeed launcher, torchrun, or none: a single process).
The data position is the optimizer step, so a resumed run reads exactly the batches the
uninterrupted run would have read (trainer/data.py), and its RNG comes from the checkpoint.

Faults (README, "Reliability"): whether and where to resume is settled, and the checkpoint
verified and matched against the config, before anything is built; bad input fails with one of
BAD_INPUT_ERRORS (the launcher prints it on one line, exit code 2); SIGTERM/SIGINT checkpoint at the
next step boundary; a step with a non-finite loss or gradient is skipped without touching weights or
optimizer state, and `training.max_bad_steps` of them in a row stop the run with a checkpoint
(TrainingStopped, exit code 3). Tests inject faults through $KVFORGE_FAULT, read once at the start
(trainer/runtime.py: Faults); stages live in trainer/stages.py.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import resource
import signal
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import atomic
from ..models.configuration_kvforge import head_dim_of
from . import checkpoint as ckpt
from .build import build_model
from .config import (Config, check_deepspeed_config, resolve_deepspeed, save_resolved, to_dict,
                     without_unused_instructions)
from .data import DataError
from .export_run import write_hf_model
from .losses import HiddenStateLoss, distillation_loss_parts
from .runtime import (FAULT_ENV, Faults, Preemption, compile_in_place, compile_summary, init_distributed,
                      on_rank0_first)
from .stages import optimizer_layout, plan_stages, stage_at, start_stage, start_stage_from_checkpoint
from .tracking import RunLogger, check_wandb_installed

# The student's submodule computing the loss from its hidden states (losses.HiddenStateLoss; no parameters).
HIDDEN_STATE_LOSS = "kvforge_hidden_state_loss"
# Set by tests only: where to write the final logits of a fixed batch.
DUMP_LOGITS_ENV = "KVFORGE_DUMP_LOGITS"
# In <run>/compressed_init: the names of the parameters surgery created or changed (training.stages `new`).
NEW_PARAMETERS_FILE = "kvforge_new_parameters.json"
# KVFORGE_PROFILE_STEP=N: rank 0 profiles optimizer step N (torch.profiler) and writes the ops' time table to
# <run>/profile_step<N>.txt (launch/benchmark_train.py --profile-step; docs/TRAINING.md).
PROFILE_STEP_ENV = "KVFORGE_PROFILE_STEP"

# bf16 dense peak of the GPUs we know, for an MFU estimate; elsewhere MFU is not logged.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    losses: dict[int, float]          # optimizer step -> mean train loss (all ranks, all micro batches)
    eval: Optional[dict]
    hf_dir: Optional[Path]
    wandb_location: Optional[str]
    skipped_steps: int = 0


class TrainingStopped(RuntimeError):
    """The run stopped itself: `training.max_bad_steps` steps in a row had a non-finite loss or gradient.
    A checkpoint was saved first; the message names it."""


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to the stage's peak (training.stages[i].lr, else training.lr), then cosine / linear decay to
    peak * min_lr_ratio at the end of the stage (or constant).

    Without training.stages one stage spans max_steps. Each stage runs the whole schedule over its own steps: it
    starts with a fresh optimizer, whose first Adam updates are as large as the learning rate whatever the
    gradients, so it warms up again.
    """
    t = cfg.training
    stage = stage_at(plan_stages(cfg), step)
    step, peak = step - stage.start, stage.lr
    if t.warmup_steps and step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return peak
    progress = (step - t.warmup_steps) / max(1, stage.steps - t.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return peak * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def resume_signature(cfg: Config, zero_stage: int) -> dict[str, Any]:
    """The config values a checkpoint is tied to, flattened to dotted keys.

    Changing one makes a resumed run a different run: other weights (model, compression, LoRA), other
    batches (data, seed, micro batch, accumulation; the world size is checked on its own), or optimizer
    state DeepSpeed cannot load (precision, ZeRO stage). Everything else (max_steps, lr, logging, ...)
    may change across a resume. `data.cache_dir` is where the data is kept, not what it is; `data.repeat` only
    permits. `data.mix` and `data.teacher_samples` count only when used, so checkpoints from before they existed
    still resume.
    """
    from .data import uses_teacher_samples

    d = to_dict(cfg)
    data = {k: v for k, v in d["data"].items() if k not in ("cache_dir", "repeat")}
    if not data["mix"]:
        del data["mix"]
    if not uses_teacher_samples(cfg.data):
        del data["teacher_samples"]
    else:
        data["teacher_samples"] = without_unused_instructions(data["teacher_samples"])
    parts = {"model": d["model"], "compression": d["compression"], "data": data, "run.seed": cfg.run.seed,
             "training.micro_batch_size": cfg.training.micro_batch_size,
             "training.grad_accum": cfg.training.grad_accum, "training.lora": d["training"]["lora"],
             "training.precision": cfg.training.precision, "deepspeed.zero_stage": zero_stage}
    if cfg.training.stages:
        # Which stage a checkpoint belongs to, and so which parameters its optimizer state holds, follows from its
        # step and the stages. (Absent without stages, so checkpoints from before stages still resume.)
        parts["training.stages"] = [f"{stage.steps} x {stage.train}" for stage in cfg.training.stages]
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):  # an empty mapping (no overrides, no compression) adds no key
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            flat[prefix] = value

    for key, value in parts.items():
        walk(key, value)
    return flat


def config_fingerprint(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def legacy_fingerprint(cfg: Config) -> str:
    """What checkpoints written before `resume_signature` existed carry instead of a signature."""
    d = to_dict(cfg)
    keep = {"model": d["model"], "data": d["data"], "compression": d["compression"],
            "micro_batch_size": d["training"]["micro_batch_size"], "grad_accum": d["training"]["grad_accum"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """6N for the weights plus the attention scores (PaLM's estimate), for MFU."""
    n = sum(p.numel() for p in model.parameters())
    mc = model.config
    return 6 * n + 12 * mc.num_hidden_layers * mc.num_attention_heads * head_dim_of(mc) * cfg.data.seq_len


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_profile(profiler, path: Path, device: torch.device, wall_s: float, rows: int = 40) -> None:
    """The profiled step's ops by their own device time (CPU time off a GPU), by total time, and by their own
    CPU time, under a header that sets the step's wall time against the time the GPU was busy (the union of
    its kernels' intervals): the difference is the host-side gap, the time the GPU waited for Python."""
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    averages = profiler.key_averages()
    header = f"step wall time {wall_s * 1e3:.1f} ms (profiler included)"
    if device.type == "cuda":
        events = profiler.events()
        busy_us = busy_time_us(e.time_range for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx") for e in events)
        header += (f"; GPU busy {busy_us / 1e3:.1f} ms ({busy_us / 1e4 / wall_s:.0f}% of the wall), "
                   f"{launches} kernel launches")
    path.write_text(f"{header}\n\nsorted by {own}\n{averages.table(sort_by=own, row_limit=rows)}\n\n"
                    f"sorted by {total}\n{averages.table(sort_by=total, row_limit=rows)}\n\n"
                    f"sorted by self_cpu_time_total (the host's side)\n"
                    f"{averages.table(sort_by='self_cpu_time_total', row_limit=rows)}\n")


def busy_time_us(intervals) -> float:
    """The length of the union of (start, end) intervals (the profiler's time ranges, in microseconds):
    kernels on several streams overlap, so their durations summed would overstate the busy time."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((r.start, r.end) for r in intervals):
        if start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def compress_for_training(cfg: Config, run_dir: Path, rank: int, log=print) -> Path:
    """The compressed starting point of this run, made once by rank 0 and kept in the run directory.

    Surgery needs the full pretrained weights and calibration activations, so it runs before DeepSpeed
    partitions anything; every rank (and a resumed run) then loads the same saved result, under
    ZeRO-3 partitioned as it loads. `log` (the trainer's, with its clock) times each phase: they can take minutes.
    """
    from kvforge.trainer.calibration_rows import load_calibration_rows
    from kvforge.models.loading import document_separator_id, load_pretrained
    from kvforge.models.surgery import compress

    out = run_dir / "compressed_init"
    # What the starting point was built from: a run directory reused with another spec (and no
    # checkpoint yet, or the resume check would have refused it) must not train the old one.
    source = {"model": to_dict(cfg)["model"], "compression": to_dict(cfg)["compression"], "seed": cfg.run.seed}
    stamp = out / "kvforge_source.json"

    def build() -> None:
        stale = stamp.is_file() and json.loads(stamp.read_text()) != source
        # A starting point made before the new parameters were recorded is made again (deterministically).
        if (out / "config.json").is_file() and (out / NEW_PARAMETERS_FILE).is_file() and not stale:
            return
        if stale:
            log(f"{out} was built from another model or compression spec: building it again")
        torch.manual_seed(cfg.run.seed)
        base, tokenizer = load_pretrained(
            cfg.model.name, gguf_file=cfg.model.gguf_file, dtype="float32", init=cfg.model.init,
            config_overrides=dict(cfg.model.config) or None, tokenizer_name=cfg.model.tokenizer)
        log(f"compression: pretrained model loaded ({cfg.model.name})")
        spec = cfg.compression.spec_for(base.config)
        rows = load_calibration_rows(tokenizer, document_separator_id(tokenizer, base.config),
                                     source=spec.calibration.source or cfg.data.source,
                                     tokens=spec.calibration.tokens, seq_len=spec.calibration.seq_len,
                                     cache_dir=cfg.data.cache_dir)
        log(f"compression: {rows.numel():,} calibration tokens ready")
        result = compress(base, spec, rows, settings=cfg.compression.surgery)
        model = result.model
        log(f"compression: surgery done (seconds: {result.report['seconds']})")
        new = changed_parameters(base, model)
        with atomic.directory(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / NEW_PARAMETERS_FILE).write_text(json.dumps(new, indent=1))
            (tmp / stamp.name).write_text(json.dumps(source, indent=2))
        log(f"compressed starting point: {out}")

    on_rank0_first(rank, build)
    return out


def changed_parameters(original: torch.nn.Module, compressed: torch.nn.Module) -> list[str]:
    """Names of the compressed model's parameters that surgery created or changed: not in the original's state
    dict, or there with another shape or other values.

    Surgery copies every other tensor bit for bit (models/surgery: transform_state_dict), so this is exactly the
    low-rank down/up projections, merged-head K/V, the q/o projections that absorb a merge, and so on, without
    repeating each method's rules here.
    """
    before = original.state_dict()
    return [name for name, p in compressed.named_parameters()
            if name not in before or before[name].shape != p.shape or not torch.equal(before[name], p.detach())]


def kv_budget(model_config) -> dict[str, float]:
    """The model's KV cache bytes per token (long-context rate, bf16 as exported) from its config's arithmetic, the
    original architecture's, and their ratio: what a run is compared by."""
    from kvforge.models.surgery import Geometry, original_kv_bytes_per_token

    # A KVForgeConfig keeps the original's layer count and KV heads; its spec says what each layer caches.
    original = original_kv_bytes_per_token(Geometry.of(model_config), "bfloat16")
    own = (model_config.kv_cache_bytes_per_token("bfloat16") if hasattr(model_config, "kv_cache_bytes_per_token")
           else original)
    return {"model/kv_bytes_per_token": own, "model/kv_bytes_per_token_original": original,
            "model/kv_fraction": own / original}


def teacher_dtype(cfg: Config) -> str:
    """training.teacher_dtype, with auto resolved to the dtype the student computes in."""
    if cfg.training.teacher_dtype != "auto":
        return cfg.training.teacher_dtype
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": cfg.model.dtype}[cfg.training.precision]


def build_teacher(cfg: Config, device: torch.device):
    """The original model, frozen, for distillation (replicated on every rank: it is never trained)."""
    from kvforge.models.loading import load_pretrained

    torch.manual_seed(cfg.run.seed)  # a random-init teacher equals the model the compression started from
    teacher, _ = load_pretrained(cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=teacher_dtype(cfg),
                                 init=cfg.model.init, config_overrides=dict(cfg.model.config) or None,
                                 device=device)
    teacher.requires_grad_(False)
    if cfg.training.compile:
        compile_in_place(teacher, cfg.training.compile_scope)
    return teacher.eval()


def build_student(cfg: Config, ds_config: dict, run_dir: Path):
    """The model to train and its tokenizer: build_model's, with its HiddenStateLoss attached (every stage's model
    gets one, or a later stage silently falls back to the logits)."""
    model, tokenizer = build_model(cfg, ds_config, run_dir)
    attach_hidden_state_loss(model)
    return model, tokenizer


def attach_hidden_state_loss(model) -> None:
    """Gives `model` its HiddenStateLoss submodule, before DeepSpeed wraps it (ZeRO-3 hooks the modules it finds
    then), when its output projection is a plain, bias-free nn.Linear: a LoRA-wrapped head computes more than its
    weight, and a biased one is not what the chunked loss computes."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and not hasattr(model, HIDDEN_STATE_LOSS):
        model.add_module(HIDDEN_STATE_LOSS, HiddenStateLoss(head))


def hidden_state_loss(model, zero_stage: int):
    """The student's HiddenStateLoss (see attach_hidden_state_loss), or None when it has none. Under ZeRO-3 the
    output projection's weight becomes that module's external parameter (again for each new engine: a later
    training stage wraps the same module anew)."""
    loss = getattr(model, HIDDEN_STATE_LOSS, None)
    if loss is not None and zero_stage >= 3:
        import deepspeed

        deepspeed.zero.register_external_parameter(loss, loss.head_weight)
    return loss


def step_loss(engine, teacher, hidden_loss, input_ids: torch.Tensor, t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro batch's loss: CE, or CE mixed with distillation from the teacher (trainer/losses.py), and its
    parts for logging ({"ce"}, and "kl" when distilling). With `hidden_loss`, from the final hidden states, so the
    [B, L, V] logits are never held (the models compute the logits of the last position only)."""
    if hidden_loss is None:
        if teacher is None:
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            return loss, {"ce": loss.detach()}
        logits = engine(input_ids=input_ids).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        return distillation_loss_parts(logits, teacher_logits, input_ids, weight=t.distill_weight,
                                       temperature=t.distill_temperature)
    hidden = engine(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    if teacher is None:
        return hidden_loss(hidden, input_ids, weight=0.0)
    with torch.no_grad():
        # use_cache=False: a stock model's config asks for a KV cache by default, which would store every layer's keys
        # and values of the batch for nothing (and, compiled per layer, recompile each layer on its cache's state).
        teacher_hidden = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                                 logits_to_keep=1).hidden_states[-1]
    return hidden_loss(hidden, input_ids, weight=t.distill_weight, temperature=t.distill_temperature,
                       teacher_hidden=teacher_hidden, teacher_head_weight=teacher.get_output_embeddings().weight)


def build_data(cfg: Config, tokenizer, model, rank: int, world: int, load_teacher=None):
    """Rank 0 tokenizes and fills the cache first; the other ranks then read it.

    Raises:
        DataError: naming the file and row of bad data, or when the data cannot fill one training step
            or give every rank an eval row, or holds token ids outside the model's vocabulary.
    """
    from kvforge.models.loading import document_separator_id

    from .data import Teacher, build_packed_datasets, default_cache_dir, teacher_identity, train_batch

    # The train/eval split does not depend on run.seed, so runs with different seeds share one eval set.
    sep = document_separator_id(tokenizer, model.config)

    def never_sample():
        # Rank 0 sampled and cached them; a rank that finds no cache reads another folder than rank 0 wrote to
        # (another node), and its own draw would differ (GPU sampling is not bitwise deterministic).
        where = cfg.data.cache_dir or default_cache_dir()
        raise DataError(f"rank {rank} finds no teacher samples where rank 0 cached them ({where}): on several "
                        "nodes, data.cache_dir (or KVFORGE_CACHE) must be a folder every node shares")

    def build(show_progress: bool):
        try:
            # teacher-samples load the original model only when they are not cached yet (on rank 0).
            load = (load_teacher if rank == 0 else never_sample) if load_teacher else None
            teacher = Teacher(teacher_identity(cfg.model, cfg.run.seed), load) if load else None
            return build_packed_datasets(cfg.data, tokenizer, sep, show_progress=show_progress, teacher=teacher)
        except FileNotFoundError as e:  # python-docs not installed, a file gone since the config was checked
            raise DataError(str(e)) from None

    packed = on_rank0_first(rank, lambda: build(True), others=lambda: build(False))
    check_same_data(packed, world)
    # Fail here, not at the first step or the first eval deep inside the loop.
    train_batch(packed, 0, world - 1, world, cfg.training.micro_batch_size, cfg.run.seed)
    if len(packed.eval) < world:
        raise DataError(f"the eval split has {len(packed.eval)} sequences, fewer than the {world} ranks: raise "
                        "data.eval_fraction or lower data.seq_len")
    top = int(max(packed.train.max(), packed.eval.max()))
    if top >= model.config.vocab_size:
        raise DataError(f"the data holds token id {top}, outside the model's vocabulary (vocab_size "
                        f"{model.config.vocab_size}): the tokenizer does not belong to model {cfg.model.name!r}; "
                        "use the model's own tokenizer (model.tokenizer=null)")
    return packed


def check_same_data(packed, world: int) -> None:
    """Every rank must hold the rows rank 0 packed: each reads its own slice of them by index. Ranks on other
    nodes read their own copies of the files and of the cache.

    Raises:
        DataError: naming the ranks whose rows differ from rank 0's.
    """
    if world == 1:
        return
    digest = hashlib.blake2b(digest_size=16)
    for rows in (packed.train, packed.eval):
        digest.update(str(tuple(rows.shape)).encode())
        digest.update(rows.contiguous().numpy())  # the buffer itself, not a copy
    digests = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DataError(f"ranks {differ} packed other training data than rank 0: every node must read the same "
                        "data files, and data.cache_dir (or KVFORGE_CACHE) must be a folder every node shares")


def heldout_name(source: str) -> str:
    """A held-out source's name in metrics: a local path's last component, else the source as given."""
    return Path(source).name if Path(source).expanduser().exists() else source


def build_heldout(cfg: Config, tokenizer, model, rank: int, world: int) -> dict[str, torch.Tensor]:
    """eval.heldout: each source's eval rows, packed as `launch/evaluate.py --task perplexity` packs them (plain
    text folders such as Debian's fortunes staged the same way), by rank 0 first."""
    from kvforge.models.loading import document_separator_id

    from .evaluation import eval_split

    sep = document_separator_id(tokenizer, model.config)

    def build(show_progress: bool) -> dict[str, torch.Tensor]:
        rows = {}
        for i, source in enumerate(cfg.eval.heldout):
            try:
                eval_rows = eval_split(source, tokenizer, sep, seq_len=cfg.data.seq_len,
                                       eval_fraction=cfg.eval.heldout_fraction, cache_dir=cfg.data.cache_dir,
                                       show_progress=show_progress)[0].eval
            except (DataError, FileNotFoundError) as e:
                raise DataError(f"eval.heldout[{i}] = {source!r}: {e}") from None
            if len(eval_rows) < world:
                raise DataError(f"eval.heldout[{i}] = {source!r} has {len(eval_rows)} eval rows of "
                                f"{cfg.data.seq_len} tokens, fewer than the {world} ranks: raise "
                                "eval.heldout_fraction or lower data.seq_len")
            rows[heldout_name(source)] = eval_rows
        return rows

    return on_rank0_first(rank, lambda: build(True), others=lambda: build(False))


def eval_metrics(result: dict) -> dict[str, float]:
    metrics = {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"]}
    for name, r in result.get("heldout", {}).items():
        metrics.update({f"eval/heldout/{name}/loss": r["loss"], f"eval/heldout/{name}/perplexity": r["perplexity"]})
    return metrics


def describe_eval(step: int, result: dict) -> str:
    text = f"step {step}: eval loss {result['loss']:.4f} perplexity {result['perplexity']:.2f}"
    heldout = [f"{name} {r['perplexity']:.2f}" for name, r in result.get("heldout", {}).items()]
    return text + (f"; held-out perplexity: {', '.join(heldout)}" if heldout else "")


def data_digest(rows: torch.Tensor) -> str:
    """A hash of the packed training rows: a resumed run must read the same ones."""
    return hashlib.sha256(memoryview(rows.contiguous().numpy()).cast("B")).hexdigest()[:32]


def eval_shard(rows: torch.Tensor, limit: int, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of the first `limit` eval rows (or all there are): together the ranks score the
    same rows on any number of GPUs (up to the remainder of an uneven split), so runs on 1 and N GPUs report
    comparable evals. Equal counts, because ZeRO-3 needs every rank in each forward; build_data leaves every rank
    at least one row, and fewer rows asked for than ranks still give each one."""
    per_rank = max(1, min(len(rows), limit) // world)
    return rows[rank * per_rank:(rank + 1) * per_rank]


def evaluate(engine, rows: torch.Tensor, cfg: Config, rank: int, world: int, device) -> dict:
    """Perplexity on the first training.eval_batches x eval.batch_size eval rows, split over the ranks and summed."""
    from .evaluation import evaluate_perplexity

    shard = eval_shard(rows, cfg.training.eval_batches * cfg.eval.batch_size, rank, world)
    engine.eval()
    with eager_even_if_compiled():
        result = evaluate_perplexity(engine.module, shard, cfg.eval.batch_size, device, distributed=world > 1)
    engine.train()
    return result


def eager_even_if_compiled():
    """A context in which compiled modules run eagerly (torch.compiler.set_stance, torch >= 2.6). Evaluation runs so:
    under no_grad, compiled layers would trace and compile a second set of graphs, 44-60 s of a GPU recipe's
    startup in session 13 (the step-0 evaluation), for evaluations that take about a second."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def skips_nonfinite_steps_itself(engine) -> bool:
    """Whether DeepSpeed's optimizer skips a step with a non-finite gradient norm on its own.

    Its wrappers (ZeRO 1-3, the bf16 and fp16 optimizers) compute the global gradient norm, reduced
    over all ranks, before the update, and on inf/NaN drop the gradients and return without touching
    the weights or the Adam moments (`optimizer.overflow`; the engine then counts `skipped_steps`
    and `was_step_applied()` is False). Without ZeRO in fp32 the engine calls the plain torch
    optimizer, which has no such check: see `gradient_norm` and `optimizer_step_skipped`.
    """
    return hasattr(engine.optimizer, "overflow")


def gradient_norm(module: torch.nn.Module) -> Optional[float]:
    """The global gradient norm for a plain torch optimizer, after the last backward of a step.

    The gradients are all-reduced by then (DeepSpeed does it in that backward), so every rank gets
    the same norm and takes the same decision about the step.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else None


@contextlib.contextmanager
def optimizer_step_skipped(optimizer: torch.optim.Optimizer):
    """Within the block, `optimizer.step()` does nothing: the one engine.step() that would apply a
    non-finite update still runs everything else (clipping, zero_grad, its step counters), while the
    plain torch optimizer leaves every weight and moment alone."""
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
    try:
        yield
    finally:
        del optimizer.step


def weight_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's bytes in its own dtype: equal for bit-equal copies of a weight, whatever the thread
    count (a float sum is not: its order depends on it)."""
    data = tensor.detach().contiguous().cpu()
    if data.dtype in (torch.bfloat16, torch.float16):
        data = data.view(torch.int16)  # numpy has no bfloat16: the bits as they are
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


@torch.no_grad()
def dump_logits(engine, rows: torch.Tensor, path: Path, rank: int, device) -> None:
    """Logits of `rows` from the model as trained, and a fingerprint of each weight as it computed them (in its
    compute dtype), written by rank 0 (every rank runs the forward and the gathers: under ZeRO-3 each holds a part
    of the weights). Tests and docs/results/multigpu-h200/compare.py compare them with the exported model: in bf16
    two correct implementations' logits differ by rounding, while the weights must match exactly."""
    import deepspeed

    engine.eval()
    logits = engine.module(input_ids=rows.long().to(device)).logits.float().cpu()
    engine.train()
    # Under ZeRO-3 the forward's prefetcher may still have gathers in flight, and a GatheredParameters exit that
    # meets one fails ("Cannot partition a param in flight": the 1B-shaped 2-GPU run of session 8); this waits for
    # them and releases every parameter (for stages 1-2 it only frees cached memory).
    engine.empty_partition_cache()
    fingerprints = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # a no-op below ZeRO-3
            fingerprints[name] = (str(param.dtype).removeprefix("torch."), weight_fingerprint(param))
    if rank == 0:
        torch.save({"input_ids": rows.long().cpu(), "logits": logits, "weights": fingerprints}, path)


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the run `cfg` describes, on every rank.

    Raises:
        one of BAD_INPUT_ERRORS: bad config, data, checkpoint, model or compression spec, found before
            the first step wherever the input allows it.
        TrainingStopped: `training.max_bad_steps` non-finite steps in a row (after saving a checkpoint).
    """
    check_wandb_installed(cfg.logging.wandb)  # on every rank, before minutes of model loading and sampling
    from tqdm.auto import tqdm

    from .data import check_epochs, describe_epochs, epoch_metrics, source_epochs, train_batch

    faults = Faults.from_env()
    rank, world, device = init_distributed()
    run_dir = Path(cfg.run.output_dir).expanduser()
    ckpt_root = run_dir / "checkpoints"
    t = cfg.training
    ds_config = resolve_deepspeed(cfg, world)
    check_deepspeed_config(ds_config)
    zero_stage = ds_config["zero_optimization"]["stage"]
    run_started = time.monotonic()

    def log(*parts, **kwargs):  # rank 0 only; seconds since the start, so a slow phase shows in any run's log
        if rank == 0:
            print(f"[{time.monotonic() - run_started:7.1f}s]", *parts, **kwargs)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_incomplete(ckpt_root)
        if removed:
            log(f"removed what an interrupted save left behind: {', '.join(removed)}")
    dist.barrier()

    # Which checkpoint (if any) this run continues from, verified and matched against this config
    # before anything is built -- and before config.yaml is overwritten, since an error message
    # points the user at it.
    signature = resume_signature(cfg, zero_stage)
    fingerprint = config_fingerprint(signature)
    resume_from, resumed = None, None
    if cfg.checkpoint.resume == "auto":
        resume_from = ckpt.find_resumable(ckpt_root, log=log)
    elif cfg.checkpoint.resume != "never":
        resume_from = Path(cfg.checkpoint.resume).expanduser()
        ckpt.verify_collective(resume_from)
    elif ckpt.complete_checkpoints(ckpt_root):
        raise ckpt.CheckpointError(f"{ckpt_root} already holds checkpoints and checkpoint.resume=never: "
                                   "choose a new run.output_dir or use checkpoint.resume=auto")
    if resume_from is not None:
        resumed = ckpt.check_compatible(resume_from, world_size=world, signature=signature,
                                        legacy_fingerprint=legacy_fingerprint(cfg))
    if rank == 0:
        save_resolved(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    dist.barrier()

    if cfg.compression:
        compress_for_training(cfg, run_dir, rank, log)
    new_parameters = (set(json.loads((run_dir / "compressed_init" / NEW_PARAMETERS_FILE).read_text()))
                      if cfg.compression else set())
    stages = plan_stages(cfg)
    stage = stage_at(stages, resumed.step if resumed is not None else 0)
    model, tokenizer = build_student(cfg, ds_config, run_dir)
    log(f"student built (ZeRO stage {zero_stage})")
    teacher = build_teacher(cfg, device) if t.distill_weight > 0 else None
    if teacher is not None:
        # Replicated, never sharded: each rank holds a whole frozen copy (no gradients, no optimizer state).
        log(f"teacher: {sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**30:.2f} GiB of "
            f"weights on every rank ({next(teacher.parameters()).dtype})")
    packed = build_data(cfg, tokenizer, model, rank, world,
                        load_teacher=lambda: teacher if teacher is not None else build_teacher(cfg, device))
    heldout = build_heldout(cfg, tokenizer, model, rank, world)
    digest = data_digest(packed.train)
    if resumed is not None and resumed.data_digest not in (None, digest):
        raise ckpt.CheckpointError(
            f"checkpoint {resume_from} was trained on other data: the packed training rows differ (digest "
            f"{resumed.data_digest}, now {digest}), so the resumed run would read different batches. The source "
            f"{cfg.data.source!r} or its tokenization changed; restore it, or start a new run")
    tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum * world
    log(f"data: {packed.stats}")
    # How many times the run reads each source; reading one twice is an error unless data.repeat allows it.
    log(check_epochs(source_epochs(packed, t.max_steps * t.grad_accum, world, t.micro_batch_size), cfg.data.repeat,
                     t.max_steps))

    # A checkpoint written inside the stage this run starts in is loaded whole; one that ended the stage before
    # holds that stage's optimizer state, so only its weights are (the path an uninterrupted run takes there).
    from_previous_stage = resumed is not None and stage_at(stages, resumed.step - 1) != stage
    if from_previous_stage:
        engine = start_stage_from_checkpoint(model, stage, new_parameters, resume_from, cfg, ds_config, zero_stage,
                                             rank, device, log)
    else:
        engine = start_stage(model, stage, new_parameters, cfg, ds_config, device, log)
    guard_gradients = not skips_nonfinite_steps_itself(engine)

    step, tokens_seen, skipped_steps, bad_in_a_row = 0, 0, 0, 0
    # A run that starts from step 0 is a new W&B run; a resumed one continues its checkpoint's.
    wandb_id = uuid.uuid4().hex[:12]
    if resumed is not None:
        state = (ckpt.read_state(resume_from) if from_previous_stage
                 else ckpt.load(engine, resume_from, optimizer_layout(engine.module)))
        step, tokens_seen = state.step, state.tokens_seen
        skipped_steps, bad_in_a_row = state.skipped_steps, state.bad_steps_in_a_row
        wandb_id = state.wandb_run_id or wandb_id
        log(f"resumed from {resume_from} at step {step}")

    logger = RunLogger(mode=cfg.logging.wandb, project=cfg.logging.project, entity=cfg.logging.entity,
                       name=cfg.run.name, run_dir=run_dir, config=to_dict(cfg) | {"deepspeed_resolved": ds_config},
                       run_id=wandb_id, rank=rank)
    logger.summarize(kv_budget(model.config), step=step)
    flops_tok = flops_per_token(engine.module, cfg)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)

    def save_checkpoint(metrics: dict) -> Path:
        state = ckpt.TrainerState(step=step, tokens_seen=tokens_seen, world_size=world,
                                  wandb_run_id=logger.run_id, config_fingerprint=fingerprint, metrics=metrics,
                                  skipped_steps=skipped_steps, bad_steps_in_a_row=bad_in_a_row,
                                  signature=signature, data_digest=digest,
                                  optimizer_groups=optimizer_layout(engine.module))
        crash = faults.fires("crash_in_save", step, rank)
        return ckpt.save(engine, ckpt_root, state, cfg.checkpoint.keep_last,
                         before_commit=(lambda: os.kill(os.getpid(), signal.SIGKILL)) if crash else None)

    def run_eval(at_step: int) -> dict:
        result = evaluate(engine, packed.eval, cfg, rank, world, device)
        result["heldout"] = {name: evaluate(engine, rows, cfg, rank, world, device) for name, rows in heldout.items()}
        logger.log(eval_metrics(result), step=at_step)
        log(describe_eval(at_step, result))
        return result

    last_eval = None
    if cfg.eval.at_start and step == 0:
        last_eval = run_eval(0)

    wants_hidden = t.loss_from == "hidden" or (t.loss_from == "auto" and teacher is not None)
    hidden_loss = hidden_state_loss(engine.module, zero_stage) if wants_hidden else None
    log(f"loss: {'from hidden states, chunked' if hidden_loss is not None else 'from full logits'} "
        f"(training.loss_from={t.loss_from})")

    losses: dict[int, float] = {}
    preemption, preempted = Preemption(), False
    profile_step = int(os.environ.get(PROFILE_STEP_ENV, "0") or 0) if rank == 0 else 0
    profiler = None
    if device.type == "cuda":
        # train/peak_memory_gib is the training steps' peak (evaluations between them included), not setup's:
        # the teacher sampler's preallocated cache alone is 45 GiB for SmolLM2 at 1,024 x 2,048.
        log(f"peak GPU memory before training: {peak_memory_gib(device):.1f} GiB (model building, teacher "
            "samples, step-0 eval); train/peak_memory_gib counts from here")
        torch.cuda.reset_peak_memory_stats(device)
    first_step = step  # where this process starts (a resumed run compiles again)
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    try:
        while step < t.max_steps:
            if step + 1 == profile_step:
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                profiler = torch.profiler.profile(activities=activities)
                profiler.__enter__()
            started = time.perf_counter()
            if faults.fires("stall", step + 1, rank):
                print(f"{FAULT_ENV}: rank {rank} (pid {os.getpid()}) stalls in step {step + 1} until a signal "
                      "arrives", flush=True)
                preemption.wait(device, timeout_s=300)
            lr = lr_at(step, cfg)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm, skip_update, loss_finite, batch_crc = 0.0, None, False, True, 0
            part_sums = {"ce": 0.0, "kl": 0.0}
            for micro in range(t.grad_accum):
                input_ids = train_batch(packed, step * t.grad_accum + micro, rank, world,
                                        t.micro_batch_size, cfg.run.seed)
                batch_crc = zlib.crc32(input_ids.numpy().tobytes(), batch_crc)
                input_ids = input_ids.to(device)
                loss, parts = step_loss(engine, teacher, hidden_loss, input_ids, t)
                if micro == 0 and faults.fires("nan_loss", step + 1, rank):
                    loss = loss * float("nan")
                if not torch.isfinite(loss.detach()).item():
                    # Backward a loss whose gradient is NaN everywhere, whatever made it non-finite, so the
                    # optimizer's check below sees it for certain. The backward passes still run on every
                    # rank and micro batch: ZeRO's gradient hooks, reductions and micro-step counters stay
                    # in step, and the update is skipped as a whole at the boundary.
                    loss_finite = False
                    loss = loss * float("nan")
                engine.backward(loss)
                if micro == t.grad_accum - 1 and guard_gradients:
                    # The plain torch optimizer (no ZeRO, fp32): DeepSpeed neither reports a gradient norm
                    # nor checks one; the full, reduced gradients are right here.
                    grad_norm = gradient_norm(engine.module)
                    skip_update = grad_norm is not None and not math.isfinite(grad_norm)
                if micro == 0 and faults.fires("sigterm", step + 1, rank):
                    os.kill(os.getpid(), signal.SIGTERM)
                with optimizer_step_skipped(engine.optimizer) if skip_update else contextlib.nullcontext():
                    engine.step()
                loss_sum += loss.item()
                for name, value in parts.items():
                    part_sums[name] += value.item()
            step += 1
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - started
            if profiler is not None:
                profiler.__exit__(None, None, None)
                write_profile(profiler, run_dir / f"profile_step{step}.txt", device, elapsed)
                profiler = None
                log(f"step {step}: profiled ({run_dir / f'profile_step{step}.txt'}); its time includes the profiler's")

            # One all-reduce for what each rank contributes: its loss, its batches' checksum, its loss's parts (CE and
            # KL), a bad-loss flag.
            summary = torch.zeros(4 + world, dtype=torch.float64, device=device)
            summary[0], summary[1], summary[4 + rank] = loss_sum / t.grad_accum, batch_crc, float(not loss_finite)
            summary[2], summary[3] = part_sums["ce"] / t.grad_accum, part_sums["kl"] / t.grad_accum
            dist.all_reduce(summary)
            loss_mean = summary[0].item() / world
            bad_loss_ranks = [r for r in range(world) if summary[4 + r].item() > 0]
            applied = not skip_update if guard_gradients else engine.was_step_applied()
            if bad_loss_ranks and applied:
                raise RuntimeError(f"step {step}: the optimizer applied an update although the loss on rank(s) "
                                   f"{bad_loss_ranks} was not finite; DeepSpeed's overflow check is off?")
            # Under fp16 an overflowing scaled gradient with a finite loss is the loss scaler's routine
            # search (the scale drops and the step is skipped), not a bad step.
            bad = not applied and (bool(bad_loss_ranks) or t.precision != "fp16")
            skipped_steps += not applied
            bad_in_a_row = bad_in_a_row + 1 if bad else 0
            losses[step] = loss_mean
            reported = engine.get_global_grad_norm()
            if reported is not None:
                grad_norm = float(reported)
            if not applied:
                what = (f"non-finite loss on rank(s) {', '.join(map(str, bad_loss_ranks))}" if bad_loss_ranks
                        else "non-finite gradients" if bad else "fp16 gradient overflow (the loss scale drops)")
                log(f"step {step}: skipped, {what}; weights and optimizer state unchanged "
                    f"({bad_in_a_row} bad step(s) in a row, at most {t.max_bad_steps}; {skipped_steps} skipped in all)")
            tok_s = tokens_per_step / elapsed
            if step % t.log_every == 0 or step == t.max_steps or not applied:
                metrics = {"train/lr": lr, "train/tokens_per_s": tok_s, "train/tokens_seen": tokens_seen,
                           "train/peak_memory_gib": peak_memory_gib(device), "train/skipped_steps": skipped_steps,
                           "train/data_checksum": int(summary[1].item())}
                if math.isfinite(loss_mean):
                    metrics["train/loss"] = loss_mean
                # loss = (1 - distill_weight) * ce + distill_weight * distill_temperature^2 * kl (trainer/losses.py)
                for i, name in [(2, "ce")] + ([(3, "kl")] if teacher is not None else []):
                    if math.isfinite(summary[i].item()):
                        metrics[f"train/{name}"] = summary[i].item() / world
                if t.stages:
                    metrics["train/stage"] = stage.index + 1
                if grad_norm is not None and math.isfinite(grad_norm):
                    metrics["train/grad_norm"] = grad_norm
                if peak:
                    metrics["train/mfu"] = flops_tok * tok_s / (peak * world)
                logger.log(metrics, step=step)
            if step == first_step + 1 and t.compile:
                log(f"step {step}: {elapsed:.1f} s, compiling included; compile: {compile_summary()}")
            bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)

            if bad_in_a_row >= t.max_bad_steps:
                bar.close()
                saved = save_checkpoint({"train/loss": None})
                last_good = step - bad_in_a_row
                message = (
                    f"{bad_in_a_row} steps in a row ({last_good + 1}-{step}) had a non-finite loss or gradients "
                    f"(training.max_bad_steps={t.max_bad_steps}); none of them changed the weights or the "
                    f"optimizer state. Checkpoint {saved} holds the model as of step {last_good} and the data "
                    "position after the skipped batches. Lower training.lr, check the data, or raise "
                    "training.max_bad_steps, then continue with checkpoint.resume=auto")
                log(f"stopping: {message}")
                logger.finish()
                raise TrainingStopped(message)
            if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                last_eval = run_eval(step)
            preempted = preemption.agreed(device)
            save_now = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
            stage_ends = step == stage.end and step < t.max_steps  # the next stage starts from this checkpoint
            if save_now or preempted or stage_ends or step == t.max_steps:
                saved = save_checkpoint({"train/loss": loss_mean if math.isfinite(loss_mean) else None})
            if preempted:
                log(f"preempted ({preemption.signal_name or 'signal on another rank'}): checkpoint saved at "
                    f"step {step}; continue with checkpoint.resume=auto")
                break
            if stage_ends:
                # A new engine over a new model (see "Stages" above): the old engine's ZeRO hooks and buffers go
                # with it, and its weights come back from the checkpoint just saved, as in a resumed run.
                stage = stages[stage.index + 1]
                engine.destroy()
                engine = hidden_loss = model = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model, _ = build_student(cfg, ds_config, run_dir)
                engine = start_stage_from_checkpoint(model, stage, new_parameters, saved, cfg, ds_config, zero_stage,
                                                     rank, device, log)
                hidden_loss = hidden_state_loss(engine.module, zero_stage) if wants_hidden else None
                engine.train()
        bar.close()
        if preempted and step < t.max_steps:
            location = logger.location
            logger.finish()
            dist.barrier()
            return TrainResult(run_dir=run_dir, final_step=step, losses=losses, eval=None, hf_dir=None,
                               wandb_location=location, skipped_steps=skipped_steps)
    finally:
        # Until here a SIGTERM means "checkpoint and stop"; from here the default (terminate) is right:
        # the last checkpoint is written, and the export below is atomic.
        preemption.restore()

    last_eval = run_eval(step)
    epochs = source_epochs(packed, step * t.grad_accum, world, t.micro_batch_size)
    log(describe_epochs(epochs, planned=False, steps=step))
    logger.log(epoch_metrics(epochs), step=step)
    if os.environ.get(DUMP_LOGITS_ENV):
        dump_logits(engine, packed.eval[:2], Path(os.environ[DUMP_LOGITS_ENV]), rank, device)

    hf_dir = None
    if cfg.checkpoint.export_hf:
        hf_dir = run_dir / "hf_model"
        final_ckpt = ckpt_root / ckpt.step_dir_name(step)
        # Rank 0 rebuilds the whole model from the checkpoint just saved (ZeRO consolidated, LoRA merged).
        on_rank0_first(rank, lambda: write_hf_model(cfg, tokenizer, final_ckpt, hf_dir, zero_stage))
        log(f"model directory: {hf_dir}")
    location = logger.location
    if location:
        log(f"W&B run ({logger.mode}): {location}")
    logger.finish()
    dist.barrier()
    return TrainResult(run_dir=run_dir, final_step=step, losses=losses, eval=last_eval, hf_dir=hf_dir,
                       wandb_location=location, skipped_steps=skipped_steps)
