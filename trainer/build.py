"""The model a run trains, built from its config: the pretrained model (or the run's compressed starting point,
`<run>/compressed_init`), LoRA-wrapped when `training.lora.r` asks for adapters.

Training builds it (partitioned under ZeRO-3), and so does the run-level export (trainer/export_run.py), whole, to
load a checkpoint's consolidated weights into.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .config import Config


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
