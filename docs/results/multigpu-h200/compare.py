"""Tables of docs/results/multigpu-h200/run.sh's runs: loss step by step against the single-GPU run of the same
ZeRO stage, tokens/s per GPU, peak memory per GPU, the resumed run against the uninterrupted one, and each
consolidated export (`<run>/hf_model`, loaded by plain transformers) against the logits the trained model gave in
memory (`<run>.logits.pt`, KVFORGE_DUMP_LOGITS).

    python3 docs/results/multigpu-h200/compare.py ~/kvgpu/multigpu
"""

import json
import statistics
import sys
from pathlib import Path


def metrics(folder: Path) -> dict[int, dict]:
    rows = {}
    path = folder / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


def main(root: Path) -> None:
    runs = {d.name: metrics(d) for d in sorted(root.iterdir()) if d.is_dir()}
    gpus = {name: 2 if "2gpu" in name else 1 for name in runs}
    print("| run | GPUs | steps | tokens/s (median, all GPUs) | per GPU | vs 1 GPU | peak GiB per GPU | "
          "max |loss - 1-GPU loss| |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in runs.items():
        if not rows:
            print(f"| {name} | {gpus[name]} | (no metrics) | | | | | |")
            continue
        steady = [r["train/tokens_per_s"] for s, r in rows.items() if s > 5]
        speed = statistics.median(steady) if steady else float("nan")
        single = runs.get(name.replace("2gpu", "1gpu").replace("-resumed", ""))
        single_speed = statistics.median(r["train/tokens_per_s"] for s, r in single.items() if s > 5) \
            if single and gpus[name] == 2 else None
        diff = max((abs(r["train/loss"] - single[s]["train/loss"]) for s, r in rows.items() if single and s in single),
                   default=float("nan")) if gpus[name] == 2 else float("nan")
        print(f"| {name} | {gpus[name]} | {len(rows)} | {speed:,.0f} | {speed / gpus[name]:,.0f} | "
              f"{'' if single_speed is None else f'{speed / gpus[name] / single_speed:.2f}'} | "
              f"{max(r.get('train/peak_memory_gib', 0) for r in rows.values()):.1f} | {diff:.4f} |")
    if "z3-2gpu-resumed" in runs and "z3-2gpu" in runs:
        resumed, whole = runs["z3-2gpu-resumed"], runs["z3-2gpu"]
        same = [s for s in resumed if s in whole]
        worst = max((abs(resumed[s]["train/loss"] - whole[s]["train/loss"]) for s in same), default=float("nan"))
        print(f"\nresumed at step 30: steps {min(same, default=0)}-{max(same, default=0)}, "
              f"max |loss - uninterrupted loss| = {worst:.2e}")
    exports(root)


def exports(root: Path) -> None:
    """Max |export logits - in-memory logits| on the dumped rows, the export loaded in bf16 (the dtype the engine
    computed in, so the same rounded weights) and in fp32 (the consolidated master weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvforge.trainer.train import weight_fingerprint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dumped in sorted(root.glob("*.logits.pt")):
        hf_dir = root / dumped.name.removesuffix(".logits.pt") / "hf_model"
        if not hf_dir.is_dir():
            print(f"{dumped.name}: no {hf_dir}")
            continue
        saved = torch.load(dumped)
        ids, trained = saved["input_ids"], saved["logits"]
        for dtype in (torch.bfloat16, torch.float32):
            model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
            exported, kind = dict(model.named_parameters()), str(dtype).removeprefix("torch.")
            # The weights the engine computed with (its dtype) against the export cast to that dtype: bit-equal
            # when the consolidation is right, whatever the kernels do to the logits.
            weights = saved.get("weights", {})
            checked = [name for name, (computed_in, _) in weights.items() if name in exported and computed_in == kind]
            same = [name for name in checked if weight_fingerprint(exported[name]) == weights[name][1]]
            if checked:
                print(f"{hf_dir.parent.name} export in {kind}: {len(same)} of "
                      f"{len(checked)} weights bit-equal to the trained model's "
                      f"({len(weights) - len(checked)} not in the export or in another dtype)")
            with torch.no_grad():
                logits = model(input_ids=ids.to(device)).logits.float().cpu()
            diff = (logits - trained).abs()
            print(f"{hf_dir.parent.name} export in {kind}: max |diff| {diff.max():.4f}, "
                  f"mean {diff.mean():.5f} (logits std {trained.std():.2f}); same argmax "
                  f"{(logits.argmax(-1) == trained.argmax(-1)).float().mean():.4f}")
            del model


if __name__ == "__main__":
    main(Path(sys.argv[1]).expanduser())
