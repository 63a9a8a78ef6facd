#!/usr/bin/env python
"""Compare a stock DeepSeek-V3 export with the kvforge export of the same surgered model (README.md beside this).

    python compare_exports.py rows --model DIR --source FOLDER --seq-len 2048 --rows 14 --out rows.pt
    python compare_exports.py compare --stock DIR --kvforge DIR --rows rows.pt --logit-rows 2 --json result.json

`rows` (imports kvforge) writes the held-out token rows exactly as launch/compress.py's perplexity takes them (the
first N rows of the eval split, trainer/data.py). `compare` imports NO kvforge module, so the kvforge export runs
its bundled modeling code (trust_remote_code) and the stock export plain transformers: both score the first
--logit-rows rows in fp32 (perplexity, max |logit difference|), decode greedily from a few prompts with their own caches, and report the
bytes their own cache objects hold after a generate(), in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "A fortune cookie says:",
    "Once upon a time, in a small village by the sea,",
)


def write_rows(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from kvforge.models.loading import document_separator_id
    from kvforge.trainer.data import build_packed_datasets

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    separator = document_separator_id(tokenizer, config)
    # The same call as launch/compress.py's eval_rows: the first --rows rows of the eval split.
    packed = build_packed_datasets({"source": args.source, "seq_len": args.seq_len}, tokenizer, separator)
    if packed.eval.shape[0] < args.rows:
        raise SystemExit(f"error: the eval split of {args.source!r} has {packed.eval.shape[0]} rows of {args.seq_len} "
                         f"tokens, fewer than --rows {args.rows}")
    rows = packed.eval[:args.rows].long()
    torch.save({"rows": rows, "source": args.source, "seq_len": args.seq_len}, args.out)
    print(f"wrote {tuple(rows.shape)} rows of {args.source!r} to {args.out}")
    return 0


def cache_bytes(cache) -> dict:
    """Bytes of the tensors the model's own cache object holds (DynamicCache layers or KVForgeCache storages)."""
    if hasattr(cache, "cache_bytes"):  # KVForgeCache: allocated slot capacity
        per_layer = [storage.num_bytes() for storage in cache.layers]
        shapes = {name: list(t.shape) for name, t in cache.layers[0].tensors.items()}
    else:
        per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                     for layer in cache.layers]
        shapes = {"keys": list(cache.layers[0].keys.shape), "values": list(cache.layers[0].values.shape)}
    held = cache.get_seq_length()
    return {"cache": type(cache).__name__, "tokens": int(held), "total_bytes": sum(per_layer),
            "bytes_per_token": sum(per_layer) / held, "layer0_tensors": shapes}


@torch.no_grad()
def measure_cache(model, tokens: int, dtype: torch.dtype) -> dict:
    model.to(dtype)
    prompt = torch.randint(3, model.config.vocab_size, (1, tokens // 2), generator=torch.Generator().manual_seed(0))
    new = tokens - prompt.shape[1] + 1  # the last new token is never fed back into the cache
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    model.to(torch.float32)
    return {"dtype": str(dtype).removeprefix("torch."), **cache_bytes(out.past_key_values)}


def compare(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not any(name.startswith("kvforge") for name in sys.modules), "compare must run without kvforge imported"
    stock = AutoModelForCausalLM.from_pretrained(args.stock, dtype=torch.float32).eval()
    kvforge = AutoModelForCausalLM.from_pretrained(args.kvforge, dtype=torch.float32, trust_remote_code=True).eval()
    classes = {"stock": f"{type(stock).__module__}.{type(stock).__name__}",
               "kvforge": f"{type(kvforge).__module__}.{type(kvforge).__name__}"}
    print(classes)
    if type(stock).__name__ != "DeepseekV3ForCausalLM" or not type(kvforge).__module__.startswith("transformers_modules"):
        raise SystemExit(f"error: expected the stock DeepseekV3ForCausalLM and the bundled (remote) kvforge class, got "
                         f"{classes}")
    data = torch.load(args.rows)
    # Both models' full logits in one process: on the shared 2-core CPU the first --logit-rows rows keep this
    # under ten minutes; the perplexity over every row comes from launch/evaluate.py (README.md).
    rows = data["rows"][:args.logit_rows]
    losses = {"stock": 0.0, "kvforge": 0.0}
    max_diff, max_logit, tokens = 0.0, 0.0, 0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, rows.shape[0], args.batch_size):
            batch = rows[start:start + args.batch_size]
            targets = batch[:, 1:].reshape(-1)
            logits = {}
            for name, model in (("kvforge", kvforge), ("stock", stock)):
                logits[name] = model(batch, use_cache=False).logits[:, :-1].float()
                losses[name] += torch.nn.functional.cross_entropy(
                    logits[name].reshape(-1, logits[name].shape[-1]), targets, reduction="sum").item()
            max_diff = max(max_diff, (logits["stock"] - logits["kvforge"]).abs().max().item())
            max_logit = max(max_logit, logits["kvforge"].abs().max().item())
            tokens += targets.numel()
            del logits
    perplexity = {name: math.exp(loss / tokens) for name, loss in losses.items()}
    relative = abs(perplexity["stock"] - perplexity["kvforge"]) / perplexity["kvforge"]
    print(f"perplexity kvforge {perplexity['kvforge']:.4f} stock {perplexity['stock']:.4f} (relative {relative:.2e}); "
          f"max |logit diff| {max_diff:.3g} (largest |logit| {max_logit:.1f}) over {tokens:,} positions; "
          f"{time.perf_counter() - started:.0f} s")

    tokenizer = AutoTokenizer.from_pretrained(args.stock)  # the same files; the kvforge dir would ask for remote code
    greedy = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = {name: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
                   for name, model in (("kvforge", kvforge), ("stock", stock))}
            agree = sum(a == b for a, b in zip(out["kvforge"], out["stock"]))
            first = next((i for i, (a, b) in enumerate(zip(out["kvforge"], out["stock"])) if a != b), None)
            greedy.append({"prompt": prompt, "same_tokens": agree, "of": args.new_tokens, "first_difference": first,
                           "kvforge_text": tokenizer.decode(out["kvforge"]), "stock_text": tokenizer.decode(out["stock"])})
            print(f"{prompt!r}: {agree}/{args.new_tokens} same; kvforge {greedy[-1]['kvforge_text']!r}"
                  + ("" if first is None else f"; stock {greedy[-1]['stock_text']!r}"))

    caches = {name: [measure_cache(model, args.cache_tokens, dtype) for dtype in (torch.float32, torch.bfloat16)]
              for name, model in (("kvforge", kvforge), ("stock", stock))}
    for name, measured in caches.items():
        for m in measured:
            print(f"{name} {m['dtype']}: {m['cache']} holds {m['total_bytes']:,} bytes for {m['tokens']} tokens = "
                  f"{m['bytes_per_token']:,.1f} B/token; layer 0 {m['layer0_tensors']}")
    result = {"classes": classes, "rows": {"source": data["source"], "count": int(rows.shape[0]),
                                           "of": int(data["rows"].shape[0]),
                                           "seq_len": data["seq_len"], "predictions": tokens},
              "weights_dtype": "float32", "perplexity": perplexity, "perplexity_relative_difference": relative,
              "max_abs_logit_difference": max_diff, "max_abs_logit": max_logit, "greedy": greedy,
              "cache": caches}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rows = sub.add_parser("rows")
    rows.add_argument("--model", required=True, help="an export directory (its tokenizer and config)")
    rows.add_argument("--source", required=True)
    rows.add_argument("--seq-len", type=int, default=2048)
    rows.add_argument("--rows", type=int, default=14)
    rows.add_argument("--out", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--stock", required=True)
    cmp.add_argument("--kvforge", required=True)
    cmp.add_argument("--rows", required=True)
    cmp.add_argument("--logit-rows", type=int, default=2, help="the first N rows are scored by both models")
    cmp.add_argument("--batch-size", type=int, default=2)
    cmp.add_argument("--new-tokens", type=int, default=32)
    cmp.add_argument("--cache-tokens", type=int, default=128, help="positions of the generate() whose cache is measured")
    cmp.add_argument("--json", default=None)
    args = parser.parse_args()
    return write_rows(args) if args.command == "rows" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
