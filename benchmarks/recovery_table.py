"""Issue 10's table: every recovery recipe's quality, cache and cost, read from the runs' committed results.

Each run in docs/results/recovery-h200/ is one `deepspeed --num_gpus 1 launch/train.py --config
configs/recovery/<recipe>.yaml run.output_dir=... model.name=<SmolLM2 GGUF> "eval.heldout=[<fortunes>]"` on one
H200, then `launch/evaluate.py --task suite` on its fp32 export (docs/results/recovery-h200/README.md, "Tenth
runs", has both commands). Per recipe, the newest scored run (folders in the order the sessions ran them, as
benchmarks/training_table.py): the cache's measured bytes per token, held-out prose perplexity after surgery (the
run's own step-0 evaluation, on its own row length) and after recovery (the suite, 2,048-token rows), against the
original and against the original finetuned on the same data mix (cross-entropy, `finetuned-original-corpus`);
passkey at 2k / 4k / 8k; tokens and epochs per source; the launcher's wall time; and issue 10's targets:
perplexity at most +2% / +5% / +10% over the original at 50% / 25% / 12.5% of its cache, passkey at 4k no worse
than the original's, within 8 minutes.

    python benchmarks/recovery_table.py              # markdown to stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_table import ORDER, RESULTS  # noqa: E402  (a sibling script, not a package)

BASELINE = "finetuned-original-corpus"  # the original, cross-entropy on the recipes' mix, 13M tokens (session 11)
# issue 10's perplexity targets by cache budget (fraction of the original's bytes), smallest budget first
TARGETS = ((0.13, 0.10), (0.26, 0.05), (0.51, 0.02))
EIGHT_MINUTES = 480


def scored_runs() -> dict[str, dict]:
    """recipe -> its newest scored run: the suite's JSON, its metrics, its wall time, the folder."""
    newest: dict[str, dict] = {}
    for folder in ORDER:
        for suite in sorted((RESULTS / folder).glob("*.json")):
            result = json.loads(suite.read_text())
            if result.get("task") != "suite":
                continue
            name = suite.stem
            metrics_path, seconds_path = suite.with_suffix(".metrics.jsonl"), suite.with_suffix(".train.seconds")
            metrics = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                       if metrics_path.exists() else [])
            seconds = int(seconds_path.read_text()) if seconds_path.exists() else None
            newest[name] = {"recipe": name, "folder": str(suite.parent.relative_to(RESULTS)), "suite": result,
                            "metrics": metrics, "seconds": seconds}
    return newest


def target_for(kv_fraction: float) -> float | None:
    return next((target for budget, target in TARGETS if kv_fraction <= budget), None)


def passkeys(suite: dict) -> dict[str, int]:
    return {length: sum(depth["correct"] for depth in result["per_depth"].values())
            for length, result in suite["passkey"].items()}


def row_of(run: dict, original: dict, baseline: dict | None) -> dict:
    suite, metrics = run["suite"], run["metrics"]
    perplexity = suite["perplexity"]["perplexity"]
    reference = original["perplexity"]["perplexity"]
    kv = suite.get("kv_cache") or {}
    fraction = kv.get("fraction_of_original", 1.0)
    step0 = next((m for m in metrics if m.get("step") == 0 and any(k.startswith("eval/heldout/") for k in m)), {})
    after_surgery = next((v for k, v in step0.items() if k.startswith("eval/heldout/") and k.endswith("perplexity")),
                         None)
    steps = max((m["step"] for m in metrics if "train/tokens_seen" in m), default=0)
    tokens = max((m["train/tokens_seen"] for m in metrics if "train/tokens_seen" in m), default=0)
    epochs = {k.removeprefix("data/epochs/"): v for m in metrics for k, v in m.items() if k.startswith("data/epochs/")}
    keys, original_keys = passkeys(suite), passkeys(original)
    target = target_for(fraction) if suite.get("role") != "finetuned-original" else None
    change = perplexity / reference - 1
    verdicts = []
    if target is not None:
        verdicts.append("met" if change <= target else f"missed by {(change - target) * 100:.1f} points")
        if keys.get("4096", 0) < original_keys.get("4096", 0):
            verdicts.append(f"passkey 4k {keys.get('4096', 0)}/20 < {original_keys['4096']}/20")
        if run["seconds"] is not None and run["seconds"] > EIGHT_MINUTES:
            verdicts.append(f"{run['seconds']} s > 8 min")
    return {
        "recipe": run["recipe"], "folder": run["folder"], "kv_bytes": kv.get("bytes_per_token"),
        "kv_fraction": fraction,
        "after_surgery": after_surgery, "perplexity": perplexity, "change": change,
        "vs_baseline": perplexity / baseline["perplexity"]["perplexity"] - 1 if baseline else None,
        "passkey": keys, "steps": steps, "tokens": tokens, "epochs": epochs, "seconds": run["seconds"],
        "target": target, "verdict": ", ".join(verdicts),
    }


def table_rows() -> tuple[dict, list[dict]]:
    runs = scored_runs()
    original = runs.pop("original")["suite"]
    baseline = runs.get(BASELINE, {}).get("suite")
    rows = [row_of(run, original, baseline) for run in runs.values()]
    return original, sorted(rows, key=lambda r: (-r["kv_fraction"], r["perplexity"]))


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    original, rows = table_rows()
    keys = passkeys(original)
    print(f"The original: perplexity {original['perplexity']['perplexity']:.2f}, passkey "
          f"{keys['2048']}/{keys['4096']}/{keys['8192']} (of 20 each). Baseline: `{BASELINE}`.\n")
    print("| recipe | KV bytes/token (of the original's) | after surgery | perplexity | vs original (target) | "
          "vs finetuned original | passkey 2k/4k/8k | steps, tokens | epochs per source | wall | verdict | run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv = f"{r['kv_bytes']:,.0f} ({r['kv_fraction']:.1%})" if r["kv_bytes"] else "-"
        surgery = f"{r['after_surgery']:.2f}" if r["after_surgery"] else "-"
        target = f" (+{r['target']:.0%})" if r["target"] is not None else ""
        baseline = f"{r['vs_baseline']:+.1%}" if r["vs_baseline"] is not None else "-"
        keys = "/".join(str(r["passkey"].get(length, "-")) for length in ("2048", "4096", "8192"))
        epochs = ", ".join(f"{Path(name).stem} {value:.2f}" for name, value in sorted(r["epochs"].items())) or "-"
        wall = f"{r['seconds']} s" if r["seconds"] is not None else "-"
        print(f"| {r['recipe']} | {kv} | {surgery} | {r['perplexity']:.2f} | {r['change']:+.1%}{target} | {baseline} | "
              f"{keys} | {r['steps']:,}, {r['tokens'] / 1e6:.1f}M | {epochs} | {wall} | {r['verdict']} | "
              f"`{r['folder']}/` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
