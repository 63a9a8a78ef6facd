#!/usr/bin/env python
"""Training throughput of the original model and of compressed recipes, through kvforge's own trainer.

Each recipe is one real run of `deepspeed --num_gpus 1 launch/train.py --config <recipe>.yaml` (ZeRO-2, bf16,
random weights of the model's architecture, stdlib docstrings): tokens/s, MFU and peak memory are what the
trainer logs per step (metrics.jsonl), reported as the median of the steps after `--warmup` (the profiled
step, if any, left out). `--profile-step N` makes the trainer profile step N of every run (KVFORGE_PROFILE_STEP,
trainer/train.py) and the table of ops by device time is copied next to the results.

    python launch/benchmark_train.py --out /tmp/bench --model smollm2-135m-instruct --steps 20 --warmup 5

On a machine without the embedded GGUF, --model takes a local directory with the model's config.json and
tokenizer files (no weights are read: init is random). Writes <out>/<recipe>.yaml, <recipe>.log,
<recipe>.profile.txt and <out>/results.json, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# name -> (compression section or None, distill weight)
RECIPES = {
    "original-ce": (None, 0.0),
    "original-kd": (None, 0.5),
    "low-rank-pre-rope-25": ({"preset": "low-rank", "arguments": {"budget": 0.25, "rope": "pre_rope_latent"}}, 0.5),
    "low-rank-partial-rope-25": ({"preset": "low-rank", "arguments": {"budget": 0.25, "rope": "partial"}}, 0.5),
    "mixattention-w256": ({"preset": "mixattention-ma", "arguments": {"window": 256}}, 0.5),
}


def recipe_config(name: str, args) -> dict:
    compression, distill = RECIPES[name]
    config = {
        "run": {"name": f"bench-{name}", "output_dir": str(Path(args.run_root) / name), "seed": 0},
        "model": {"name": args.model, "init": "random", "dtype": "bfloat16"},
        "data": {"source": "stdlib-docstrings", "seq_len": args.seq_len, "eval_fraction": 0.01,
                 "cache_dir": str(Path(args.run_root) / "data-cache")},
        "training": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "grad_accum": 1, "lr": 1e-4,
                     "warmup_steps": 2, "precision": "bf16", "distill_weight": distill, "eval_every": 0,
                     "log_every": 1},
        "deepspeed": {"zero_stage": 2},
        "logging": {"wandb": "disabled"},
        "checkpoint": {"save_every": 0, "resume": "never", "export_hf": False},
        "eval": {"at_start": False},
    }
    if compression is not None:
        config["compression"] = {**compression, "calibration": {"tokens": 8192, "seq_len": 512}}
    return config


def summarize(metrics_file: Path, warmup: int, profile_step: int) -> dict:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in rows if "train/tokens_per_s" in r}
    measured = [s for s in sorted(steps) if s > warmup and s != profile_step]
    if not measured:  # e.g. out of memory in the first steps: the log says why
        return {"error": f"no step after warm-up {warmup} in {metrics_file} (steps logged: {sorted(steps)})"}
    tok_s = statistics.median(steps[s]["train/tokens_per_s"] for s in measured)
    mfu = [steps[s]["train/mfu"] for s in measured if "train/mfu" in steps[s]]
    return {"steps_measured": measured, "tokens_per_s": tok_s,
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gib": max(r["train/peak_memory_gib"] for r in steps.values()),
            "loss_first_last": [steps[min(steps)].get("train/loss"), steps[max(steps)].get("train/loss")]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--run-root", default="/tmp/kvforge-bench", help="where the runs write (not copied)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--profile-step", type=int, default=0, help="profile this step of every run (0: none)")
    parser.add_argument("--launcher", default="deepspeed", help="the deepspeed launcher to call")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. 'before')")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides passed to every run's launch/train.py (e.g. training.compile=true)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f".{args.tag}" if args.tag else ""
    results = {}
    for name in args.recipes:
        config_path = out / f"{name}{tag}.yaml"
        config_path.write_text(yaml.safe_dump(recipe_config(name, args), sort_keys=False))
        run_dir = Path(args.run_root) / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [args.launcher, "--num_gpus", "1", str(ROOT / "launch" / "train.py"), "--config", str(config_path),
                   *args.set]
        env = dict(os.environ)
        if args.profile_step:
            env["KVFORGE_PROFILE_STEP"] = str(args.profile_step)
        started = time.perf_counter()
        with open(out / f"{name}{tag}.log", "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wall = time.perf_counter() - started
        entry = {"command": " ".join(command), "exit_code": code, "wall_s": round(wall, 1)}
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.is_file():
            entry |= summarize(metrics_file, args.warmup, args.profile_step)
        profile = run_dir / f"profile_step{args.profile_step}.txt"
        if args.profile_step and profile.is_file():
            shutil.copy(profile, out / f"{name}{tag}.profile.txt")
        results[name] = entry
        print(f"{name}: {json.dumps(entry)}", flush=True)
        (out / f"results{tag}.json").write_text(json.dumps(results, indent=2))

    print("\n| recipe | tokens/s | MFU | peak memory | exit |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "tokens_per_s" in r:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} GiB | {r['exit_code']} |")
        else:
            print(f"| {name} | - | - | - | {r['exit_code']} |")
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
