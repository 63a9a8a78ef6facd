"""The training loop: one file, read top to bottom.

    config -> ranks -> model (+ compression) -> packed data -> DeepSpeed engine -> resume?
      -> for step: lr(step); grad_accum x (micro batch -> loss -> backward); engine.step()
         log / eval / checkpoint
      -> final checkpoint -> consolidated Hugging Face directory -> final eval

Ranks come from the environment (the deepspeed launcher, torchrun, or none: a single process).
The data position is the optimizer step, so a resumed run reads exactly the batches the
uninterrupted run would have read (trainer/data.py), and its RNG comes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, resolve_deepspeed, save_resolved, to_dict
from .losses import distillation_loss
from .tracking import RunLogger

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


# ---------------------------------------------------------------------------------------------------
# Ranks


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device from the environment; a lone process becomes a world of one."""
    import deepspeed

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, default)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # Each CPU rank would otherwise start one thread per core, and the ranks fight over them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and returns.

    The ranks agree through an all-reduce, so every rank saves at the same step even when the
    signal reached only one of them (schedulers signal the whole job; a user may signal one pid).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# Pieces of the loop


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine / linear decay to lr * min_lr_ratio at max_steps (or constant)."""
    t = cfg.training
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def config_fingerprint(cfg: Config) -> str:
    """What must not change across a resume: the model, the data and the compression spec."""
    d = to_dict(cfg)
    keep = {"model": d["model"], "data": d["data"], "compression": d["compression"],
            "micro_batch_size": d["training"]["micro_batch_size"], "grad_accum": d["training"]["grad_accum"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and embeddings (the usual GPT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """6N for the weights plus the attention scores (PaLM's estimate), for MFU."""
    n = sum(p.numel() for p in model.parameters())
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    return 6 * n + 12 * mc.num_hidden_layers * mc.num_attention_heads * head_dim * cfg.data.seq_len


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def compress_for_training(cfg: Config, run_dir: Path, rank: int) -> Path:
    """The compressed starting point of this run, made once by rank 0 and kept in the run directory.

    Surgery needs the full pretrained weights and calibration activations, so it runs before DeepSpeed
    partitions anything; every rank (and a resumed run) then loads the same saved result, under
    ZeRO-3 partitioned as it loads.
    """
    from kvforge.models.calibration import load_calibration_rows
    from kvforge.models.loading import document_separator_id, load_pretrained
    from kvforge.models.surgery import build_compressed_model, parse_compression

    out = run_dir / "compressed_init"
    if rank == 0 and not (out / "config.json").is_file():
        torch.manual_seed(cfg.run.seed)
        base, tokenizer = load_pretrained(
            cfg.model.name, gguf_file=cfg.model.gguf_file, dtype="float32", init=cfg.model.init,
            config_overrides=dict(cfg.model.config) or None, tokenizer_name=cfg.model.tokenizer)
        spec, _ = parse_compression(cfg.compression, base.config)
        rows = load_calibration_rows(tokenizer, document_separator_id(tokenizer, base.config),
                                     source=spec.calibration.source or cfg.data.source,
                                     tokens=spec.calibration.tokens, seq_len=spec.calibration.seq_len,
                                     cache_dir=cfg.data.cache_dir)
        model = build_compressed_model(base, cfg.compression, rows)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
        print(f"compressed starting point: {out}")
    dist.barrier()
    return out


def model_source(cfg: Config, run_dir: Path) -> dict:
    """Where the weights to train come from: the pretrained model, or the run's compressed starting point."""
    if cfg.compression:
        return dict(name=str(run_dir / "compressed_init"), gguf_file=None, init="pretrained",
                    config_overrides=None, tokenizer_name=None)
    return dict(name=cfg.model.name, gguf_file=cfg.model.gguf_file, init=cfg.model.init,
                config_overrides=dict(cfg.model.config) or None, tokenizer_name=cfg.model.tokenizer)


def build_model(cfg: Config, ds_config: Optional[dict], run_dir: Path, device="cpu"):
    """The model to train (LoRA-wrapped when asked) and its tokenizer.

    With a ZeRO-3 `ds_config` the parameters are partitioned as they load; with None the model is
    whole (rank 0 rebuilds it that way to write the consolidated export).
    """
    from transformers.integrations import HfDeepSpeedConfig

    from kvforge.models.loading import load_pretrained

    # Keep the HfDeepSpeedConfig object alive while loading: transformers then builds the model under
    # deepspeed.zero.Init, so no rank ever holds the full set of parameters.
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    torch.manual_seed(cfg.run.seed)  # random init is identical on every rank
    source = model_source(cfg, run_dir)
    model, tokenizer = load_pretrained(source.pop("name"), dtype=cfg.model.dtype, device=device, **source)
    del hf_ds
    lora = cfg.training.lora
    if lora.r:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [m for m in lora.target_modules if m in present]
        if not targets:
            raise ValueError(f"training.lora.target_modules {lora.target_modules} name no module of this model "
                             f"(it has e.g. {sorted(present)[:12]})")
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets,
                                                 modules_to_save=list(lora.modules_to_save) or None))
    return model, tokenizer


def build_teacher(cfg: Config, device: torch.device):
    """The original model, frozen, for distillation (replicated on every rank: it is never trained)."""
    from kvforge.models.loading import load_pretrained

    torch.manual_seed(cfg.run.seed)  # a random-init teacher equals the model the compression started from
    teacher, _ = load_pretrained(cfg.model.name, gguf_file=cfg.model.gguf_file, dtype=cfg.model.dtype,
                                 init=cfg.model.init, config_overrides=dict(cfg.model.config) or None,
                                 device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_data(cfg: Config, tokenizer, model, rank: int):
    """Rank 0 tokenizes and fills the cache first; the other ranks then read it."""
    from kvforge.models.loading import document_separator_id

    from .data import build_packed_datasets

    # The train/eval split does not depend on run.seed, so runs with different seeds share one eval set.
    sep = document_separator_id(tokenizer, model.config)
    if rank == 0:
        packed = build_packed_datasets(cfg.data, tokenizer, sep)
    dist.barrier()
    if rank != 0:
        packed = build_packed_datasets(cfg.data, tokenizer, sep, show_progress=False)
    return packed


def evaluate(engine, rows: torch.Tensor, cfg: Config, rank: int, world: int, device) -> dict:
    """Perplexity on this rank's equal share of the eval rows, summed over ranks."""
    from .evaluation import evaluate_perplexity

    per_rank = min(len(rows) // world, cfg.training.eval_batches * cfg.eval.batch_size)
    if per_rank == 0:
        raise ValueError(f"the eval split has {len(rows)} sequences, fewer than the {world} ranks: raise "
                         "data.eval_fraction or lower data.seq_len")
    shard = rows[rank * per_rank:(rank + 1) * per_rank]  # equal counts: ZeRO-3 needs every rank in each forward
    engine.eval()
    result = evaluate_perplexity(engine.module, shard, cfg.eval.batch_size, device, distributed=world > 1)
    engine.train()
    return result


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config) -> TrainResult:
    import deepspeed
    from tqdm.auto import tqdm

    from .data import micro_batch

    rank, world, device = init_distributed()
    run_dir = Path(cfg.run.output_dir).expanduser()
    ckpt_root = run_dir / "checkpoints"
    t = cfg.training
    ds_config = resolve_deepspeed(cfg, world)
    zero_stage = ds_config["zero_optimization"]["stage"]
    log = print if rank == 0 else (lambda *a, **k: None)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_incomplete(ckpt_root)
        if removed:
            log(f"removed incomplete checkpoints left by an interrupted save: {removed}")
        save_resolved(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    dist.barrier()

    # Which checkpoint (if any) this run continues from, decided before anything is built.
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        resume_from = ckpt.find_resumable(ckpt_root, log=log)
    elif cfg.checkpoint.resume != "never":
        resume_from = Path(cfg.checkpoint.resume).expanduser()
        ckpt.verify(resume_from)
    elif ckpt.complete_checkpoints(ckpt_root):
        raise ckpt.CheckpointError(f"{ckpt_root} already holds checkpoints and checkpoint.resume=never: "
                                   "choose a new run.output_dir or use checkpoint.resume=auto")

    if cfg.compression:
        compress_for_training(cfg, run_dir, rank)
    model, tokenizer = build_model(cfg, ds_config, run_dir)
    teacher = build_teacher(cfg, device) if t.distill_weight > 0 else None
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    packed = build_data(cfg, tokenizer, model, rank)
    tokens_per_step = t.micro_batch_size * cfg.data.seq_len * t.grad_accum * world
    log(f"data: {packed.stats}")

    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                      eps=t.eps, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           model_parameters=None if optimizer else model.parameters())

    fingerprint = config_fingerprint(cfg)
    step, tokens_seen, wandb_id = 0, 0, None
    if resume_from is not None:
        state = ckpt.load(engine, resume_from, world_size=world, config_fingerprint=fingerprint)
        step, tokens_seen, wandb_id = state.step, state.tokens_seen, state.wandb_run_id
        log(f"resumed from {resume_from} at step {step}")

    logger = RunLogger(mode=cfg.logging.wandb, project=cfg.logging.project, entity=cfg.logging.entity,
                       name=cfg.run.name, run_dir=run_dir, config=to_dict(cfg) | {"deepspeed_resolved": ds_config},
                       run_id=wandb_id, rank=rank)
    flops_tok = flops_per_token(engine.module, cfg)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)

    last_eval = None
    if cfg.eval.at_start and step == 0:
        last_eval = evaluate(engine, packed.eval, cfg, rank, world, device)
        logger.log({"eval/loss": last_eval["loss"], "eval/perplexity": last_eval["perplexity"]}, step=0)
        log(f"step 0: eval loss {last_eval['loss']:.4f} perplexity {last_eval['perplexity']:.2f}")

    losses: dict[int, float] = {}
    preemption, preempted = Preemption(), False
    bar = tqdm(total=t.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    while step < t.max_steps:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, grad_norm = 0.0, None
        for micro in range(t.grad_accum):
            input_ids = micro_batch(packed.train, step * t.grad_accum + micro, rank, world,
                                    t.micro_batch_size, cfg.run.seed).to(device)
            if teacher is None:
                loss = engine(input_ids=input_ids, labels=input_ids).loss
            else:
                logits = engine(input_ids=input_ids).logits
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=input_ids).logits
                loss = distillation_loss(logits, teacher_logits, input_ids, weight=t.distill_weight,
                                         temperature=t.distill_temperature)
            engine.backward(loss)
            if zero_stage == 0 and micro == t.grad_accum - 1:
                # Without ZeRO (fp32), DeepSpeed reports no norm; the full gradients are right here.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads).item() if grads else None
            engine.step()
            loss_sum += loss.item()
        step += 1
        tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - started

        loss_mean = _all_mean(loss_sum / t.grad_accum, device)
        losses[step] = loss_mean
        reported = engine.get_global_grad_norm()
        if reported is not None:
            grad_norm = float(reported)
        tok_s = tokens_per_step / elapsed
        if step % t.log_every == 0 or step == t.max_steps:
            metrics = {"train/loss": loss_mean, "train/lr": lr, "train/tokens_per_s": tok_s,
                       "train/tokens_seen": tokens_seen, "train/peak_memory_gib": peak_memory_gib(device)}
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            if peak:
                metrics["train/mfu"] = flops_tok * tok_s / (peak * world)
            logger.log(metrics, step=step)
        bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)

        if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
            last_eval = evaluate(engine, packed.eval, cfg, rank, world, device)
            logger.log({"eval/loss": last_eval["loss"], "eval/perplexity": last_eval["perplexity"]}, step=step)
        preempted = preemption.agreed(device)
        save_now = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0
        if save_now or preempted or step == t.max_steps:
            state = ckpt.TrainerState(step=step, tokens_seen=tokens_seen, world_size=world,
                                      wandb_run_id=logger.run_id, config_fingerprint=fingerprint,
                                      metrics={"train/loss": loss_mean})
            ckpt.save(engine, ckpt_root, state, cfg.checkpoint.keep_last)
        if preempted:
            log(f"preempted: checkpoint saved at step {step}; continue with checkpoint.resume=auto")
            break
    bar.close()
    preemption.restore()
    if preempted and step < t.max_steps:
        location = logger.location
        logger.finish()
        dist.barrier()
        return TrainResult(run_dir=run_dir, final_step=step, losses=losses, eval=None, hf_dir=None,
                           wandb_location=location)

    last_eval = evaluate(engine, packed.eval, cfg, rank, world, device)
    logger.log({"eval/loss": last_eval["loss"], "eval/perplexity": last_eval["perplexity"]}, step=step)
    log(f"step {step}: eval loss {last_eval['loss']:.4f} perplexity {last_eval['perplexity']:.2f}")

    hf_dir = None
    if cfg.checkpoint.export_hf:
        hf_dir = run_dir / "hf_model"
        export_hf_model(cfg, engine, tokenizer, ckpt_root / ckpt.step_dir_name(step), hf_dir, rank, zero_stage)
        log(f"model directory: {hf_dir}")
    location = logger.location
    if location:
        log(f"W&B run ({logger.mode}): {location}")
    logger.finish()
    dist.barrier()
    return TrainResult(run_dir=run_dir, final_step=step, losses=losses, eval=last_eval, hf_dir=hf_dir,
                       wandb_location=location)


def export_hf_model(cfg: Config, engine, tokenizer, ckpt_dir: Path, out_dir: Path, rank: int, zero_stage: int) -> None:
    """A consolidated Hugging Face directory (safetensors) from any ZeRO stage, LoRA merged, written atomically.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer state, so they are rebuilt from
    the checkpoint just written (never from the live module, whose ZeRO-3 parameters are empty
    placeholders); without ZeRO the module holds them. Rank 0 loads them into a whole copy of the model
    (strictly: a missing or empty tensor is an error), saves the LoRA adapter on its own, merges it and
    saves the model.
    """
    import shutil

    if rank == 0:
        if zero_stage == 0:
            state_dict = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        model, _ = build_model(cfg, None, out_dir.parent)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise RuntimeError(f"the consolidated weights do not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        if cfg.training.lora.r:
            adapter = out_dir.with_name("lora_adapter")
            model.save_pretrained(adapter, safe_serialization=True)
            model = model.merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    dist.barrier()


def _tied_keys(model) -> set[str]:
    """Parameters that are the same tensor as another (tied embeddings) appear once in a consolidated dict."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(p.data_ptr(), name)
    return tied
