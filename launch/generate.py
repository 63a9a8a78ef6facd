#!/usr/bin/env python
"""Load a model directory the way a user would and generate: plain transformers, trust_remote_code.

    python launch/generate.py --model runs/smollm2-recover/export --prompt "What does os.path.join do?"

Prints the completion, then the KV cache that generate() really allocated (bytes of its tensors),
per token, next to the spec's arithmetic and the uncompressed original's. Works on exported
kvforge models (their modeling code is bundled) and on ordinary Hugging Face models alike; nothing
from kvforge is imported, so it is also a check that an export stands on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def allocated_cache_bytes(cache) -> int:
    """Bytes of the tensors a cache holds: KVForgeCache accounts for itself; for transformers' DynamicCache
    (an uncompressed model) the keys and values of every layer are summed."""
    if hasattr(cache, "cache_bytes"):
        return cache.cache_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def original_bytes_per_token(config, element_size: int) -> int:
    """The uncompressed model's cache: 2 (K and V) x layers x KV heads x head dim."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="a model directory (exported or plain HF)")
    p.add_argument("--prompt", default="Explain what a Python context manager is, with a short example.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if not args.model.is_dir():
        print(f"error: --model {args.model} is not a directory", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    if args.raw or tokenizer.chat_template is None:
        text = args.prompt
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    completion = tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)

    # transformers >= 5.24 names it `cache`, earlier 5.x `past_key_values` (kvforge is not imported here).
    cache = out.cache if "cache" in out else out.past_key_values
    tokens = cache.get_seq_length()
    element_size = torch.empty((), dtype=model.dtype).element_size()
    result = {
        "model": str(args.model), "model_type": model.config.model_type, "device": device,
        "prompt_tokens": inputs.input_ids.shape[1], "cache_tokens": tokens,
        "cache_bytes": allocated_cache_bytes(cache),
        "kv_bytes_per_token": allocated_cache_bytes(cache) / tokens,
        "original_kv_bytes_per_token": original_bytes_per_token(model.config, element_size),
        "completion": completion, "seconds": round(time.perf_counter() - started, 1),
    }
    if hasattr(model.config, "kv_cache_bytes_per_token"):
        result["spec_kv_bytes_per_token"] = model.config.kv_cache_bytes_per_token(model.dtype, num_tokens=tokens)

    print(f"--- {args.model} ({model.config.model_type}, {args.dtype}, {device})")
    print(f"prompt: {args.prompt}")
    print(f"completion: {completion.strip()}")
    spec = f", spec arithmetic {result['spec_kv_bytes_per_token']:,.0f}" if "spec_kv_bytes_per_token" in result else ""
    print(f"KV cache after {tokens} tokens: {result['cache_bytes']:,} bytes allocated = "
          f"{result['kv_bytes_per_token']:,.0f} bytes/token{spec}; the uncompressed original: "
          f"{result['original_kv_bytes_per_token']:,} bytes/token "
          f"({result['kv_bytes_per_token'] / result['original_kv_bytes_per_token']:.1%})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
