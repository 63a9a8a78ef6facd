#!/usr/bin/env python
"""Compress a pretrained model: `python launch/compress.py --model <name> --spec <preset | yaml> --out <dir>`.

    pretrained model + spec --calibration (train split of --calib-source)--> surgery --> <out>/
        config.json + weights (save_pretrained), tokenizer, surgery_report.json

and prints, per layer and in total, the KV bytes per token MEASURED from the cache tensors that a real
generate() allocates (KVForgeCache's own accounting; the original model's DynamicCache likewise) next to
the spec's arithmetic, and the perplexity before and after surgery on a fixed held-out slice: the first
--eval-rows rows of --eval-seq-len tokens of the eval split of --eval-source (trainer/data.py, the same
document split and cache as training).

--spec is a preset name (models/presets.py; `--list-presets`) with `--arg key=value` arguments, or a YAML
file holding the `compression:` section of a training config (or a whole training config):

    preset: low-rank              # or  layers: [{attention: window, window: 1024}, ...]
    arguments: {budget: 0.25, rope: partial, rope_dims: 16}
    surgery: {rank_allocation: greedy}
    calibration: {source: python-docs, tokens: 65536, seq_len: 512}

--budget F (a fraction of the original KV cache) sets the section's one budget knob, surgery.budget_fraction
(replacing an arguments.budget), and, unless the section chooses a rank allocation, spends it greedily
(surgery.rank_allocation=greedy); a preset with a budget argument (low-rank) is built at it too
(models/surgery/compression_config.py). `--surgery key=value` sets any SurgerySettings field (models/surgery).

Calibration statistics are cached under $KVFORGE_CACHE/calibration (keyed by model, data and settings),
and the original model's perplexity under the same folder, so a sweep pays for them once.

Examples:
  python launch/compress.py --model smollm2-135m-instruct --spec merged-heads --arg num_kv_heads=1 --out runs/merged1
  python launch/compress.py --spec low-rank --budget 0.25 --arg rope=partial --out runs/lr25
  python launch/compress.py --spec mixattention-ma --arg window=512 --out runs/ma
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars/lists: 0.5, 16, true, null, [[0, 3]], partial."""
    return yaml.safe_load(text)


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: {flag} {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="hub id, HF directory, .gguf or the embedded default")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--spec", help="a preset name or a YAML file with the compression section")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="a preset argument (repeatable)")
    p.add_argument("--budget", type=float, default=None, help="KV budget as a fraction of the original cache, in (0, 1]")
    p.add_argument("--surgery", action="append", default=[], metavar="KEY=VALUE", help="a SurgerySettings field (repeatable)")
    p.add_argument("--calib-source", default=None, help="calibration text (default: the spec's, else python-docs)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default: the spec's, 131072)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration row length (default: the spec's, 512)")
    p.add_argument("--eval-source", default=None, help="held-out text for perplexity (default: the calibration source)")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="tokens per eval row, and the context the KV "
                   "bytes/token are measured at (default: %(default)s)")
    p.add_argument("--eval-rows", type=int, default=8, help="eval rows (the first N of the eval split; 0: skip)")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--measure-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the generate() run whose cache is measured (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where calibration statistics and original perplexities are cached")
    p.add_argument("--out", type=Path, default=None, help="output directory (save_pretrained + tokenizer + report), "
                   "written beside it and renamed in: an earlier output there is replaced as a whole")
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    return p


def load_spec_section(spec: str, preset_arguments: dict[str, Any]) -> Any:
    """A preset name (+ arguments) or a YAML file -> the `compression:` section as a dict."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise SystemExit(f"error: spec file {path} does not exist")
        section = yaml.safe_load(path.read_text())
        if isinstance(section, dict) and "compression" in section:
            section = section["compression"]
        if not isinstance(section, dict):
            raise SystemExit(f"error: {path} must hold a mapping (the compression section), got {type(section).__name__}")
        if preset_arguments:
            section.setdefault("arguments", {}).update(preset_arguments)
        return section
    return {"preset": spec, "arguments": preset_arguments}


def apply_budget(section: dict[str, Any], budget: float) -> dict[str, Any]:
    """--budget: the section's one budget knob, spent greedily unless the section chooses (see the module doc)."""
    if not 0 < budget <= 1:
        raise SystemExit(f"error: --budget must be a fraction in (0, 1] of the original KV cache, got {budget}")
    section = json.loads(json.dumps(section))
    (section.get("arguments") or {}).pop("budget", None)
    surgery = section.setdefault("surgery", {})
    surgery["budget_fraction"] = budget
    surgery.setdefault("rank_allocation", "greedy")
    return section


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_folder(cache_dir: Optional[str]) -> Path:
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("KVFORGE_CACHE") or Path.home() / ".cache" / "kvforge")
    return root.expanduser() / "calibration"


def calibration_statistics(model, tokenizer, separator: int, *, model_key: dict, source: str, tokens: int, seq_len: int,
                           attention_rows: int, attention_metric: str, batch_size: int, folder: Path):
    """Collect (or read back) the statistics; attention maps are cached separately (they are optional)."""
    import torch

    from kvforge import atomic
    from kvforge.models.calibration import (
        STATISTICS_VERSION, CalibrationStatistics, attention_divergence, collect_statistics,
    )
    from kvforge.trainer.calibration_rows import load_calibration_rows

    key = {"model": model_key, "source": source, "tokens": tokens, "seq_len": seq_len, "version": STATISTICS_VERSION}
    path = folder / f"moments-{_digest(key)}.pt"
    rows = None
    if path.is_file():
        stats = CalibrationStatistics.load(path)
        print(f"calibration statistics: read {path} ({stats.tokens:,} tokens of {source!r})")
    else:
        rows = load_calibration_rows(tokenizer, separator, source=source, tokens=tokens, seq_len=seq_len)
        started = time.perf_counter()
        stats = collect_statistics(model, rows, batch_size=batch_size, meta={"source": source, **model_key})
        stats.save(path)
        print(f"calibration statistics: {stats.tokens:,} tokens of {source!r} in {time.perf_counter() - started:.0f} s "
              f"-> {path}")
    if attention_rows:
        map_key = {**key, "attention_rows": attention_rows, "metric": attention_metric}
        map_path = folder / f"attention-{_digest(map_key)}.pt"
        if map_path.is_file():
            stats.attention_divergence = torch.load(map_path)
        else:
            if rows is None:
                rows = load_calibration_rows(tokenizer, separator, source=source, tokens=tokens, seq_len=seq_len)
            stats.attention_divergence = attention_divergence(model, rows[:attention_rows], metric=attention_metric)
            with atomic.file(map_path) as tmp:
                torch.save(stats.attention_divergence, tmp)
        stats.attention_metric, stats.attention_rows = attention_metric, attention_rows
    return stats


def eval_rows(tokenizer, separator: int, source: str, seq_len: int, count: int):
    from kvforge.trainer.evaluation import eval_split

    # eval_split, as launch/evaluate.py reads held-out text: a folder of plain files without a suffix (Debian's
    # fortunes) is staged as .txt links; the data layer's default eval fraction, so the rows stay what they were.
    packed, _, _ = eval_split(source, tokenizer, separator, seq_len=seq_len, eval_fraction=0.05)
    if packed.eval.shape[0] < count:
        raise SystemExit(f"error: the eval split of {source!r} has {packed.eval.shape[0]} rows of {seq_len} tokens, "
                         f"fewer than --eval-rows {count}")
    return packed.eval[:count].long()


def perplexity(model, rows, batch_size: int) -> dict[str, float]:
    from kvforge.trainer.evaluation import evaluate_perplexity

    started = time.perf_counter()
    result = evaluate_perplexity(model, rows, batch_size, "cpu")
    return {**result, "seconds": round(time.perf_counter() - started, 1)}


def measured_in(dtype: Any, measure, model, prompt: Any, **kwargs) -> dict[str, Any]:
    """`measure(model, prompt)` on a copy of `model` in `dtype`. The model keeps its own precision: cast down and
    back in place, every weight it is later scored with or saved as would be rounded to `dtype`."""
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    return measure(model, prompt, **kwargs)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        from kvforge.models.presets import PRESETS

        for name, fn in sorted(PRESETS.items()):
            print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if not args.spec:
        raise SystemExit("error: --spec is required (a preset name or a YAML file; --list-presets lists presets)")
    for flag, value in (("--eval-rows", args.eval_rows), ("--eval-seq-len", args.eval_seq_len - 1)):
        if value < 0 or (flag == "--eval-seq-len" and value < 1):
            raise SystemExit(f"error: {flag} is out of range")
    if args.out is not None:
        args.out = args.out.expanduser().resolve()
        if args.out.exists() and not (args.out / "surgery_report.json").is_file() and (
                not args.out.is_dir() or any(args.out.iterdir())):
            raise SystemExit(f"error: --out {args.out} exists and is not an earlier launch/compress.py output (no "
                             "surgery_report.json); it would be replaced as a whole: choose another directory")

    import torch

    from kvforge import atomic
    from kvforge.models.loading import document_separator_id, load_pretrained
    from kvforge.models.surgery import (
        CompressionConfig, Geometry, compress, measure_generate_kv_bytes, measure_original_kv_bytes, needs_statistics,
        original_kv_bytes_per_token,
    )

    torch.manual_seed(0)
    model, tokenizer = load_pretrained(args.model, gguf_file=args.gguf_file, dtype="float32")
    separator = document_separator_id(tokenizer, model.config)
    geometry = Geometry.of(model.config)

    section = load_spec_section(args.spec, _key_values(args.arg, "--arg"))
    section.setdefault("surgery", {}).update(_key_values(args.surgery, "--surgery"))
    if args.budget is not None:
        section = apply_budget(section, args.budget)
    section["surgery"].setdefault("context_tokens", args.eval_seq_len)
    compression = CompressionConfig.from_section(section)
    spec, settings = compression.spec_for(model.config), compression.surgery
    source = args.calib_source or spec.calibration.source or "python-docs"
    tokens = args.calib_tokens or spec.calibration.tokens
    seq_len = args.calib_seq_len or spec.calibration.seq_len
    spec.calibration.source, spec.calibration.tokens, spec.calibration.seq_len = source, tokens, seq_len
    eval_source = args.eval_source or source
    folder = cache_folder(args.cache_dir)
    model_key = {"model": args.model, "gguf_file": args.gguf_file, "dtype": "float32"}

    # ---- original: perplexity (cached) and measured cache
    rows = eval_rows(tokenizer, separator, eval_source, args.eval_seq_len, args.eval_rows) if args.eval_rows else None
    original: dict[str, Any] = {"arithmetic_bytes_per_token": original_kv_bytes_per_token(geometry, args.measure_dtype)}
    prompt = (rows[:1] if rows is not None else torch.randint(0, model.config.vocab_size, (1, args.eval_seq_len)))
    prompt = prompt[:, : args.eval_seq_len - 3]  # + 4 generated tokens, 3 of them fed back = eval_seq_len held
    measure_dtype = getattr(torch, args.measure_dtype)
    # The original's numbers depend only on the model and the eval/measure settings: computed once, cached.
    original_path = folder / f"original-{_digest({**model_key, 'source': eval_source, 'seq_len': args.eval_seq_len, 'rows': args.eval_rows, 'measure_dtype': args.measure_dtype})}.json"
    if original_path.is_file():
        original.update(json.loads(original_path.read_text()))
    else:
        if rows is not None:
            original["perplexity"] = perplexity(model, rows, args.eval_batch_size)
            print(f"original perplexity {original['perplexity']['perplexity']:.3f} ({original['perplexity']['seconds']} s)")
        original["measured"] = measured_in(measure_dtype, measure_original_kv_bytes, model, prompt)
        atomic.write_text(original_path, json.dumps(original))

    # ---- surgery
    stats = None
    if needs_statistics(spec, settings):
        stats = calibration_statistics(
            model, tokenizer, separator, model_key=model_key, source=source, tokens=tokens, seq_len=seq_len,
            attention_rows=settings.attention_rows if settings.needs_attention_maps() else 0,
            attention_metric=settings.attention_metric, batch_size=settings.calibration_batch_size, folder=folder)
    result = compress(model, spec, None, settings=settings, statistics=stats)
    compressed = result.model

    after = perplexity(compressed, rows, args.eval_batch_size) if rows is not None else None
    measured = measured_in(measure_dtype, measure_generate_kv_bytes, compressed, prompt, max_new_tokens=4)

    # ---- report
    spec_per_layer = [layer.kv_cache_bytes_per_slot(geometry.num_kv_heads, geometry.head_dim, measure_dtype)
                      * layer.kv_cache_slots(measured["tokens"]) / measured["tokens"] for layer in result.spec.layers]
    print(f"\n{'layer':>5}  {'spec':<58} {'measured B/tok':>14} {'spec B/tok':>11} {'original':>9}")
    for i, layer in enumerate(result.spec.layers):
        entry = result.report["layers"][i]
        what = entry["kv"] + (f", {entry['probs']}" if "probs" in entry else "")
        if layer.is_window:
            what = f"window {layer.window}+{layer.sinks}: " + what
        print(f"{i:>5}  {what[:58]:<58} {measured['per_layer_bytes_per_token'][i]:>14.1f} {spec_per_layer[i]:>11.1f} "
              f"{original['measured']['per_layer_bytes_per_token'][i]:>9.1f}")
    total_original = original["measured"]["bytes_per_token"]
    long_rate = result.spec.kv_cache_bytes_per_token(num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
                                                     dtype=args.measure_dtype)
    print(f"total  KV bytes/token at {measured['tokens']} tokens ({args.measure_dtype}): measured "
          f"{measured['bytes_per_token']:,.1f} | spec {sum(spec_per_layer):,.1f} | original measured {total_original:,.1f} "
          f"(arithmetic {original['arithmetic_bytes_per_token']:,}) -> {measured['bytes_per_token'] / total_original:.1%} "
          f"of the original; long-context rate (window layers amortised) {long_rate:,.1f} ({long_rate / total_original:.1%})")
    if after is not None:
        before = original["perplexity"]
        print(f"perplexity on {args.eval_rows} x {args.eval_seq_len} held-out tokens of {eval_source!r} (eval split): "
              f"original {before['perplexity']:.3f} -> compressed {after['perplexity']:.3f} "
              f"({after['perplexity'] / before['perplexity'] - 1:+.1%})")
    report = {
        "model": args.model, "spec_argument": args.spec, "section": section, "spec": result.spec.to_dict(),
        "surgery_seconds": result.report["seconds"], "layers": result.report["layers"],
        "kv": {"dtype": args.measure_dtype, "tokens": measured["tokens"], "measured": measured,
               "spec_bytes_per_token": sum(spec_per_layer), "long_context_bytes_per_token": long_rate,
               "original": original["measured"], "original_arithmetic_bytes_per_token": original["arithmetic_bytes_per_token"],
               "fraction_of_original": measured["bytes_per_token"] / total_original},
        "perplexity": None if after is None else {"original": original["perplexity"], "compressed": after,
                                                 "source": eval_source, "rows": args.eval_rows, "seq_len": args.eval_seq_len},
        "calibration": {"source": source, "tokens": tokens, "seq_len": seq_len} if stats is not None else None,
        "settings": result.report["settings"],
    }
    if args.out is not None:
        with atomic.directory(args.out) as tmp:  # a crash never leaves a half-written starting point
            compressed.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "surgery_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if args.json is not None:
        atomic.write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
