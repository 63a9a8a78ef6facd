#!/usr/bin/env python
"""Train (or recover) a model: `deepspeed launch/train.py --config configs/x.yaml [key.sub=value ...]`.

Also runs under torchrun, or as a plain single process for debugging. The deepspeed launcher adds
`--local_rank`; ranks are read from the environment either way.

Exit codes: 0 finished, or preempted by SIGTERM/SIGINT after saving a checkpoint (continue with
checkpoint.resume=auto); 2 bad input (config, data, checkpoint, model), one line on stderr;
3 stopped after training.max_bad_steps non-finite steps in a row, with a checkpoint.
"""

import argparse
import json
import os
import sys

from kvforge.trainer.config import (ConfigError, check_deepspeed_config, load_config, parse_cli_overrides,
                                    resolve_deepspeed, to_dict)


def check_model_and_compression(cfg) -> None:
    """Resolve the model's config (no weights) and check the compression section (parsed by load_config) against
    it, so a bad model name or spec fails here, in a second, and not after data and weights are loaded."""
    from kvforge.models.loading import config_for

    model_config = config_for(cfg.model.name, gguf_file=cfg.model.gguf_file,
                              config_overrides=dict(cfg.model.config) or None)
    if cfg.compression:
        cfg.compression.spec_for(model_config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve everything (config, DeepSpeed `auto` values) without training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, parse_cli_overrides(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        check_model_and_compression(cfg)
    except ValueError as e:  # ModelLoadError, CompressionSpecError, PresetError, SurgeryError
        print(f"config error: {e}", file=sys.stderr)
        return 2

    if args.print_config or args.dry_run:
        from omegaconf import OmegaConf

        world = int(os.environ.get("WORLD_SIZE", "1"))
        resolved = to_dict(cfg)
        if args.dry_run:
            resolved["deepspeed"]["resolved"] = resolve_deepspeed(cfg, world)
            try:  # what DeepSpeed itself would reject or silently ignore
                check_deepspeed_config(resolved["deepspeed"]["resolved"])
            except ConfigError as e:
                print(f"config error: {e}", file=sys.stderr)
                return 2
        if int(os.environ.get("RANK", "0")) == 0:
            print(OmegaConf.to_yaml(resolved))
        return 0

    from kvforge.trainer.runtime import BAD_INPUT_ERRORS
    from kvforge.trainer.train import TrainingStopped, train

    # Bad input (data, checkpoint, model, spec) and a run that stops itself end in one line on stderr,
    # not a traceback; KVFORGE_DEBUG=1 shows the traceback. Every rank reports (the lines are the same
    # when all ranks found the same problem). Exit codes: 2 bad input, 3 stopped (a checkpoint was saved).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""
    try:
        result = train(cfg)
    except BAD_INPUT_ERRORS as e:
        if os.environ.get("KVFORGE_DEBUG"):
            raise
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped{where}: {e}", file=sys.stderr)
        return 3
    if result.eval is not None and int(os.environ.get("RANK", "0")) == 0:
        summary = {"run_dir": str(result.run_dir), "step": result.final_step, "eval": result.eval,
                   "hf_model": str(result.hf_dir) if result.hf_dir else None, "wandb": result.wandb_location}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    code = main()
    # The process group's native threads stopped before the interpreter tears down (a CI run once saw a bad-input
    # exit end in "terminate called without an active exception", rc -6 for 2). Only here: a main() called in
    # process keeps its group, since DeepSpeed keeps its backend after a group is destroyed (tests/trainer/conftest.py).
    from kvforge.trainer.runtime import shutdown_distributed

    shutdown_distributed()
    sys.exit(code)
