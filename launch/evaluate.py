#!/usr/bin/env python
"""Evaluate a model: `python launch/evaluate.py --model <model> [--task perplexity] [options]`.

<model> is anything kvforge loads (a Hugging Face directory, a hub id, a .gguf file, the embedded
`smollm2-135m-instruct`) or a training run directory (its consolidated `hf_model/` is evaluated).

Tasks (--task, default perplexity):
  perplexity  token-weighted mean next-token NLL and its exp over the eval split of --data, packed into
              rows of --seq-len exactly as training packs them (trainer/data.py: split by document, the
              same cache). Evaluates every eval row unless --max-batches is given.
  passkey     pass-key retrieval (trainer/passkey.py): --samples prompts of --context-len tokens per
              depth in --depths, greedy answers, accuracy per depth; --pyramid-budget evaluates with a
              PyramidKV cache (--pyramid-schedule pyramid | uniform).
  suite       everything one model needs for the comparison table and plot (docs/EVALUATION.md):
              perplexity as above, passkey at each of --context-lens, and the KV cache bytes per token
              measured from a real generate() over --kv-tokens tokens in --kv-dtype, next to the original
              architecture's. A run directory is refused when --data is a source it trained or
              calibrated on (its config.yaml), unless --allow-training-source.

Prints the result and, with --json, writes it with the model, data settings and timings;
`launch/plot_results.py` draws suite JSONs of several models.

Examples:
  python launch/evaluate.py --model smollm2-135m-instruct --data python-docs --seq-len 512
  python launch/evaluate.py --model runs/smollm2-recover --max-batches 8 --json eval.json
  python launch/evaluate.py --task passkey --model smollm2-135m-instruct --context-len 4096 --samples 4 \
      --pyramid-budget 256 --pyramid-schedule pyramid --json passkey.json
  python launch/evaluate.py --task suite --model runs/lr50 --data /usr/share/games/fortunes --seq-len 1024 \
      --max-batches 8 --batch-size 1 --context-lens 2048 4096 8192 --label "low-rank 50%" --json results/lr50.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def resolve_model_argument(model: str) -> str:
    """A training run directory stands for its consolidated model (`<run>/hf_model`); anything else is
    passed to `load_pretrained` as it is.

    Raises:
        ModelLoadError: `model` is one step's DeepSpeed checkpoint (partitioned engine state, not a model).
    """
    from kvforge.models.loading import ModelLoadError
    from kvforge.trainer.checkpoint import MANIFEST, TRAINER_STATE

    path = Path(model).expanduser()
    if (path / "hf_model" / "config.json").is_file():
        return str(path / "hf_model")
    if (path / MANIFEST).is_file() and (path / TRAINER_STATE).is_file():
        run_dir = path.parent.parent
        raise ModelLoadError(f"{model!r} is a DeepSpeed training checkpoint (engine state), not a model directory; "
                             f"evaluate the run's consolidated model instead: --model {run_dir} (its hf_model/ "
                             "is written when the run finishes)")
    return model


# ----------------------------------------------------------------------------------------------------
# Tasks: each adds its options to the parser and evaluates a loaded model. A new task (e.g. passkey
# retrieval) is one more `add_*_arguments` + `run_*` pair and one entry in TASKS.


def add_perplexity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("perplexity", "the eval split of a data source (see trainer/data.py)")
    group.add_argument("--data", default="python-docs",
                       help="python-docs | stdlib-docstrings | a local file or folder | a hub dataset "
                            "(default: %(default)s)")
    group.add_argument("--text-field", default="text", help="text column of JSON/parquet/hub data (default: text)")
    group.add_argument("--split", default="train", help="split of a hub dataset to read documents from")
    group.add_argument("--config-name", default=None, help="config name of a hub dataset")
    group.add_argument("--seq-len", type=_int_at_least(2), default=512, help="tokens per row (default: 512)")
    group.add_argument("--eval-fraction", type=_fraction, default=0.05,
                       help="fraction of documents held out for eval (default: 0.05)")
    group.add_argument("--split-seed", type=int, default=0,
                       help="seed of the document split (default: 0; a training run uses its run.seed)")
    group.add_argument("--max-documents", type=_int_at_least(1), default=None,
                       help="read only the first N documents of the source")
    group.add_argument("--cache-dir", default=None, help="packed-data cache (default: $KVFORGE_CACHE/data)")
    group.add_argument("--batch-size", type=_int_at_least(1), default=4, help="rows per forward (default: 4)")
    group.add_argument("--max-batches", type=_int_at_least(1), default=None,
                       help="evaluate only the first N batches of the eval split (default: all)")
    group.add_argument("--allow-training-source", action="store_true",
                       help="evaluate a run directory on a source it trained or calibrated on (refused by default)")


def run_perplexity(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    result, _ = _perplexity(args, model, tokenizer, device)
    return result


def _perplexity(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> tuple[dict[str, Any], Any]:
    """The perplexity result and the eval rows it was computed on."""
    from kvforge.models.loading import document_separator_id
    from kvforge.trainer.evaluation import eval_split, evaluate_perplexity

    separator = document_separator_id(tokenizer, model.config)
    started = time.perf_counter()
    packed, data_settings, staged = eval_split(
        args.data, tokenizer, separator, seq_len=args.seq_len, eval_fraction=args.eval_fraction,
        cache_dir=args.cache_dir, split_seed=args.split_seed, text_field=args.text_field, split=args.split,
        config_name=args.config_name, max_documents=args.max_documents)
    if staged is not None:
        print(f"--data {args.data}: {staged['files']} plain text files without a .txt suffix, read as one document "
              f"each through {staged['staged_as']} ({staged['skipped_binary']} binary files skipped)")
    data_seconds = time.perf_counter() - started
    rows = packed.eval
    started = time.perf_counter()
    result = evaluate_perplexity(model, rows, args.batch_size, device, args.max_batches)
    eval_seconds = time.perf_counter() - started
    evaluated_rows = result["tokens"] // (args.seq_len - 1)
    print(f"perplexity {result['perplexity']:.4f}  (loss {result['loss']:.5f} nats/token over "
          f"{result['tokens']:,} predictions: {evaluated_rows} of {rows.shape[0]} eval rows x {args.seq_len} "
          f"tokens of {args.data!r}; {eval_seconds:.1f} s, {result['tokens'] / eval_seconds:,.0f} tokens/s)")
    return {
        **result,
        "rows": evaluated_rows,
        "eval_rows_available": int(rows.shape[0]),
        # `source` is what the user named (what results are compared by); `staged` says how it was read.
        "data": {**data_settings, "source": args.data, "staged": staged, "document_separator_id": separator,
                 "stats": {k: v for k, v in packed.stats.items() if k != "cache_file"}},
        "seconds": {"data": round(data_seconds, 3), "eval": round(eval_seconds, 3)},
    }, rows


def _depths(text: str) -> list[float]:
    from kvforge.trainer.passkey import parse_depths

    try:
        return parse_depths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_passkey_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("passkey", "a pass key hidden at several depths of filler text "
                                                 "(trainer/passkey.py)")
    group.add_argument("--context-len", type=_int_at_least(64), default=4096,
                       help="prompt tokens (at most; default: %(default)s)")
    group.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="where the key goes, as fractions of the filler (default: 0,0.25,0.5,0.75,1)")
    group.add_argument("--samples", type=_int_at_least(1), default=4, help="prompts per depth (default: 4)")
    group.add_argument("--passkey-seed", type=int, default=0, help="seed of the pass keys (default: 0)")
    group.add_argument("--passkey-format", default="plain", choices=("plain", "chat"),
                       help="raw text, or the tokenizer's chat template (default: %(default)s)")
    group.add_argument("--max-new-tokens", type=_int_at_least(1), default=8,
                       help="tokens generated per prompt (default: %(default)s)")
    pyramid = parser.add_argument_group("PyramidKV", "evaluate with a compacted cache (models/pyramid.py); a "
                                                     "plain model is converted to an all-dense KVForge model first")
    pyramid.add_argument("--pyramid-budget", type=_int_at_least(1), default=None,
                         help="average tokens kept per layer after the prompt (default: the model's "
                              "compression.inference.pyramid, else the full cache)")
    pyramid.add_argument("--pyramid-schedule", choices=("pyramid", "uniform"), default=None,
                         help="per-layer budgets decreasing with depth, or equal (default: pyramid)")
    pyramid.add_argument("--pyramid-window", type=_int_at_least(1), default=None,
                         help="observation window: last prompt tokens that score the rest (default: 8)")
    pyramid.add_argument("--pyramid-pooling", choices=("avgpool", "maxpool", "none"), default=None,
                         help="smoothing of the scores before top-k (default: avgpool)")
    pyramid.add_argument("--pyramid-kernel", type=_int_at_least(1), default=None, help="pooling kernel (default: 7)")
    pyramid.add_argument("--pyramid-beta", type=float, default=None,
                         help="top layer keeps 1/beta of the average selectable budget (default: 20)")
    pyramid.add_argument("--pyramid-sinks", type=_int_at_least(0), default=None,
                         help="first tokens always kept (default: 4)")
    pyramid.add_argument("--full-cache", action="store_true",
                         help="keep every token even when the model was exported with a PyramidKV default")


def run_passkey(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    try:
        return _run_passkey(args, model, tokenizer, device)
    except ValueError as err:  # bad settings (PyramidError, passkey arguments): a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_passkey(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    from kvforge.models.pyramid import PyramidSettings, new_pyramid_cache
    from kvforge.trainer.passkey import evaluate_passkey

    overrides = {"budget": args.pyramid_budget, "schedule": args.pyramid_schedule, "window": args.pyramid_window,
                 "pooling": args.pyramid_pooling, "kernel_size": args.pyramid_kernel, "beta": args.pyramid_beta,
                 "sinks": args.pyramid_sinks}
    default = (model.config.compression or {}).get("inference", {}).get("pyramid") \
        if getattr(model.config, "model_type", None) == "kvforge" else None
    new_cache, pyramid = None, None
    if args.full_cache:
        given = ["--pyramid-" + k.replace("_size", "") for k, v in overrides.items() if v is not None]
        if given:
            raise ValueError(f"--full-cache keeps every token: drop {', '.join(given)}")
        if default is not None:  # the exported default would apply: ask the model's own cache class for none
            cache_cls = sys.modules[type(model).__module__].KVForgeCache
            max_cache_len = args.context_len + args.max_new_tokens

            def full_cache():
                return cache_cls(model.config, max_cache_len=max_cache_len, pyramid=False)

            new_cache = full_cache
    elif args.pyramid_budget is not None or default is not None:
        if getattr(model.config, "model_type", None) != "kvforge":
            from kvforge.models.configuration_kvforge import CompressionSpec
            from kvforge.models.surgery import compress

            model = compress(model, CompressionSpec.dense(model.config.num_hidden_layers)).model.to(device)
        pyramid = PyramidSettings.from_any(default or {}, **overrides)
        max_cache_len = args.context_len + args.max_new_tokens
        caches = []

        def make_cache():  # one per prompt; the last one's report goes into the JSON
            caches.append(new_pyramid_cache(model, pyramid, max_cache_len=max_cache_len))
            return caches[-1]

        new_cache = make_cache
    elif any(v is not None for k, v in overrides.items() if k != "budget"):
        raise ValueError("--pyramid-* options need --pyramid-budget (or a model exported with a PyramidKV default)")

    def show(record):
        mark = "ok " if record.correct else "MISS"
        print(f"  depth {record.depth:<5g} sample {record.sample}: {mark} key {record.passkey} -> "
              f"{record.generated.strip()!r} ({record.prompt_tokens} tokens)", flush=True)

    result = evaluate_passkey(model, tokenizer, context_len=args.context_len, depths=args.depths,
                              samples=args.samples, seed=args.passkey_seed, fmt=args.passkey_format,
                              max_new_tokens=args.max_new_tokens, cache_factory=new_cache, progress=show)
    per_depth = "  ".join(f"{d}: {v['correct']}/{v['samples']}" for d, v in result.per_depth.items())
    cache = "full cache" if pyramid is None else f"PyramidKV {pyramid.schedule} budget {pyramid.budget}"
    print(f"passkey accuracy {result.accuracy:.3f} at {args.context_len} tokens ({cache}); by depth {per_depth}; "
          f"{result.elapsed_s:.1f} s")
    payload = result.to_dict()
    payload["cache"] = {"pyramid": None} if pyramid is None else caches[-1].pyramid.report()
    return payload


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from kvforge.trainer.results_plot import ROLES

    group = parser.add_argument_group("suite", "perplexity (options above) + passkey at several lengths (passkey "
                                               "options above) + the measured KV cache")
    group.add_argument("--context-lens", type=_int_at_least(64), nargs="+", default=[2048, 4096, 8192],
                       help="passkey prompt lengths (default: 2048 4096 8192)")
    group.add_argument("--kv-tokens", type=_int_at_least(1), default=None,
                       help="prompt tokens of the generate() whose cache is measured (default: the largest "
                            "--context-lens; window layers make bytes/token depend on it)")
    group.add_argument("--kv-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                       help="dtype the model is cast to for the cache measurement, after the other tasks "
                            "(default: %(default)s, the exported dtype)")
    group.add_argument("--label", default=None, help="name of this point in plots (default: --model)")
    group.add_argument("--role", choices=ROLES, default=None,
                       help="original | finetuned-original | compressed (default: compressed when the cache is "
                            "smaller than the original's, else finetuned-original for a run directory, else "
                            "original); plot_results.py draws the first two as reference lines")


def measure_kv_cache(model: Any, input_ids: Any, dtype: str) -> dict[str, Any]:
    """Bytes per token of the cache a real greedy generate() allocates, next to the original architecture's.

    KVForge models: the cache's own accounting (models.surgery.measure_generate_kv_bytes); plain HF models:
    the tensors of their DynamicCache (models.surgery.measure_original_kv_bytes). The model is cast to
    `dtype` for this and left there.
    """
    import torch

    from kvforge.models.surgery import (Geometry, measure_generate_kv_bytes, measure_original_kv_bytes,
                                        original_kv_bytes_per_token)
    from kvforge.trainer.evaluation import is_kvforge

    torch_dtype = getattr(torch, dtype)
    model.to(torch_dtype)
    started = time.perf_counter()
    if is_kvforge(model):
        measured = measure_generate_kv_bytes(model, input_ids, max_new_tokens=4)
        how = "KVForgeCache.cache_bytes() after generate()"
    else:
        measured = measure_original_kv_bytes(model, input_ids)
        how = "tensors of the DynamicCache generate() returned"
    original = original_kv_bytes_per_token(Geometry.of(model.config), dtype)
    return {"bytes_per_token": measured["bytes_per_token"], "total_bytes": measured["total_bytes"],
            "tokens": measured["tokens"], "prompt_tokens": int(input_ids.shape[1]), "dtype": dtype,
            "original_bytes_per_token": original, "fraction_of_original": measured["bytes_per_token"] / original,
            "per_layer_bytes_per_token": measured["per_layer_bytes_per_token"], "measured_from": how,
            "seconds": round(time.perf_counter() - started, 3)}


def run_suite(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    try:
        return _run_suite(args, model, tokenizer, device)
    except ValueError as err:  # bad settings for this model: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_suite(args: argparse.Namespace, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    import torch

    # The cache measured is the one generate() makes by default; a passkey cache chosen on the command
    # line would make the two parts of one result describe different caches.
    given = [flag for flag, value in (("--pyramid-budget", args.pyramid_budget), ("--full-cache", args.full_cache))
             if value]
    if given:
        raise ValueError(f"--task suite measures the cache the model's generate() allocates by default, so "
                         f"{' and '.join(given)} would make its passkey and KV numbers disagree: export the model "
                         "with the PyramidKV setting you want (launch/export.py --pyramid-budget), or run "
                         "--task passkey on its own")
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in args.context_lens if limit is not None and n > limit]
    if too_long:  # checked before the first hour of work, not after it
        raise ValueError(f"--context-lens {too_long} exceed the model's max_position_embeddings ({limit})")

    started = time.perf_counter()
    perplexity, rows = _perplexity(args, model, tokenizer, device)
    passkey = {}
    for context_len in args.context_lens:
        print(f"passkey at {context_len} tokens:", flush=True)
        passkey[str(context_len)] = _run_passkey(argparse.Namespace(**{**vars(args), "context_len": context_len}),
                                                 model, tokenizer, device)
    kv_tokens = args.kv_tokens or max(args.context_lens)
    # Real text for the prompt (the eval rows, repeated if they hold fewer tokens): the cache's size does
    # not depend on the tokens, but a PyramidKV selection does.
    flat = rows.flatten()
    prompt = flat.repeat(-(-kv_tokens // flat.numel()))[:kv_tokens].unsqueeze(0).to(device=device, dtype=torch.long)
    kv_cache = measure_kv_cache(model, prompt, args.kv_dtype)
    print(f"KV cache {kv_cache['bytes_per_token']:,.1f} bytes/token in {args.kv_dtype} after generate() over "
          f"{kv_tokens} tokens ({kv_cache['fraction_of_original']:.3f} of the original's "
          f"{kv_cache['original_bytes_per_token']:,})")
    return {"perplexity": perplexity, "passkey": passkey, "kv_cache": kv_cache,
            "suite_seconds": round(time.perf_counter() - started, 3)}


def infer_role(args: argparse.Namespace, kv_fraction: float, is_run: bool) -> str:
    if args.role is not None:
        return args.role
    if kv_fraction < 0.999:
        return "compressed"
    return "finetuned-original" if is_run else "original"


TASKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[..., dict[str, Any]]]] = {
    "perplexity": (add_perplexity_arguments, run_perplexity),
    "passkey": (add_passkey_arguments, run_passkey),
    "suite": (add_suite_arguments, run_suite),
}


# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a Hugging Face directory, hub id, .gguf file, 'smollm2-135m-instruct', or a run directory")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside the --model directory or hub repo")
    parser.add_argument("--tokenizer", default=None, help="load the tokenizer from here instead of --model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weight dtype (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--task", default="perplexity", choices=sorted(TASKS), help="what to evaluate (default: perplexity)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    for add_arguments, _ in TASKS.values():
        add_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from kvforge import atomic
    from kvforge.models.loading import ModelLoadError, load_pretrained
    from kvforge.trainer.data import DataError
    from kvforge.trainer.evaluation import TrainingSourceError, check_eval_source

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        parser.error(f"argument --device: expected cpu, cuda or cuda:N, got {device!r}")
    _, run_task = TASKS[args.task]
    try:
        model_name = resolve_model_argument(args.model)
        is_run = model_name != args.model
        source_check = None
        if is_run and args.task in ("perplexity", "suite"):  # before the model loads: a wrong --data fails fast
            source_check = check_eval_source(args.model, args.data, allow=args.allow_training_source)
            if source_check["allowed"]:
                print(f"warning: --data {args.data!r} is what run {args.model} trained on "
                      f"({', '.join(source_check['overlaps'])}); evaluated anyway (--allow-training-source)",
                      file=sys.stderr)
        started = time.perf_counter()
        # A stock export (e.g. DeepSeek-V3 from --format stock) scores like any model; the suite's KV fraction reads
        # the original's geometry from the config, which such a class no longer has, so the suite refuses it.
        model, tokenizer = load_pretrained(model_name, gguf_file=args.gguf_file, dtype=args.dtype,
                                           tokenizer_name=args.tokenizer, device=device,
                                           allow_stock_exports=args.task != "suite")
        load_seconds = time.perf_counter() - started
        result = run_task(args, model, tokenizer, device)
    except (ModelLoadError, DataError, FileNotFoundError, TrainingSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.task == "suite":
        role = infer_role(args, result["kv_cache"]["fraction_of_original"], is_run)
        result = {"label": args.label or args.model, "role": role, **result, "training_source_check": source_check}
        print(f"{result['label']} ({role}): perplexity {result['perplexity']['perplexity']:.3f}, passkey "
              + ", ".join(f"{n}: {p['accuracy']:.2f}" for n, p in result["passkey"].items())
              + f", KV {result['kv_cache']['bytes_per_token']:,.0f} B/token")
    if args.json is not None:
        payload = {"task": args.task, "model": args.model, "model_loaded_from": model_name, "dtype": args.dtype,
                   "device": device, "model_load_seconds": round(load_seconds, 3), **result}
        atomic.write_text(args.json.expanduser(), json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
