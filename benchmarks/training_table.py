"""Issue 11's table: training speed of every recipe through kvforge's own trainer, read from the runs' committed logs.

Each recovery run in docs/results/recovery-h200/ is one `deepspeed --num_gpus 1 launch/train.py --config
configs/recovery/<recipe>.yaml` on one H200 (micro batch 16 x 2,048, ZeRO-2, bf16); its metrics.jsonl holds the
trainer's own tokens/s, MFU and peak memory per step, and its config.yaml the settings it ran with. This prints,
per recipe, the newest run (folders in the order the sessions ran them), the median over steps after the fifth
(the first steps compile), against issue 11's targets: >= 100k tokens/s with distillation in <= 40 GiB, >= 150k
with cross-entropy on the uncompressed model.

    python benchmarks/training_table.py              # markdown to stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "recovery-h200"
# The folders in the order their runs happened (the top level holds the first runs).
ORDER = [".", "lr3e-4", "staged", "instructed", "shared-rotary", "corpus", "int8/first-machine", "int8",
         "session11", "session12", "session13", "session14", "session15", "session16", "session17", "session22"]
FIRST_MEASURED_STEP = 6  # steps 1-5 hold the compile and the allocator's warm-up


def run_row(metrics_path: Path) -> dict | None:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "train/tokens_per_s" in r and r["step"] >= FIRST_MEASURED_STEP]
    if not steps:
        return None
    config_path = metrics_path.with_name(metrics_path.name.replace(".metrics.jsonl", ".config.yaml"))
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    training = config.get("training", {})
    kv = next((r for r in records if "model/kv_fraction" in r), {})
    return {
        "recipe": metrics_path.name.removesuffix(".metrics.jsonl"),
        "folder": str(metrics_path.parent.relative_to(RESULTS)),
        "kv_fraction": kv.get("model/kv_fraction", 1.0),
        "loss": "KD" if training.get("distill_weight", 0) > 0 else "CE",
        "compile": (training.get("compile_scope", "model") if training.get("compile") else "eager")
        if config else "?",
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steps),
        "mfu": statistics.median(r["train/mfu"] for r in steps) if "train/mfu" in steps[0] else None,
        "peak_gib": max(r["train/peak_memory_gib"] for r in steps),
        "steps": len(steps) + FIRST_MEASURED_STEP - 1,
    }


def newest_runs() -> list[dict]:
    newest: dict[str, dict] = {}
    for folder in ORDER:
        for path in sorted((RESULTS / folder).glob("*.metrics.jsonl")):
            row = run_row(path)
            if row is not None:
                newest[row["recipe"]] = row  # later folders replace earlier ones
    return sorted(newest.values(), key=lambda r: (r["loss"] == "KD", -r["kv_fraction"], r["recipe"]))


def verdict(row: dict) -> str:
    if row["loss"] == "CE":
        target = 150_000 if row["kv_fraction"] == 1.0 else None
        return "" if target is None else ("met" if row["tokens_per_s"] >= target else
                                          f"missed by {1 - row['tokens_per_s'] / target:.0%}")
    fast, small = row["tokens_per_s"] >= 100_000, row["peak_gib"] <= 40
    if fast and small:
        return "met"
    return ", ".join(what for what, ok in (("< 100k tokens/s", fast), ("> 40 GiB", small)) if not ok)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print("| recipe | KV | loss | compiled | tokens/s (median) | MFU | peak | steps | target | run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in newest_runs():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"| {row['recipe']} | {row['kv_fraction']:.1%} | {row['loss']} | {row['compile']} | "
              f"{row['tokens_per_s']:,.0f} | {mfu} | {row['peak_gib']:.1f} GiB | {row['steps']} | {verdict(row)} | "
              f"`{row['folder']}/` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
