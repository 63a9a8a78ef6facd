"""A stock export (launch/export.py --format stock) served by llama.cpp: greedy tokens against transformers'.

    python benchmarks/serving_llamacpp.py --export <stock dir> --gguf <converted .gguf> [--new-tokens 48]

The GGUF comes from llama.cpp's own converter (convert_hf_to_gguf.py of the llama.cpp tree that
llama-cpp-python vendors), so nothing of kvforge is between the export and the engine:

    python <llama.cpp>/convert_hf_to_gguf.py <stock dir> --outfile model.f32.gguf --outtype f32

Runs on CPU in float32 on both sides. For each prompt, transformers (plain AutoModelForCausalLM, no remote code)
and llama-cpp-python decode greedily from the same token ids; the script prints how many of the new tokens agree
(and where they first differ), and the KV cache llama.cpp allocates for --n-ctx tokens against the export's
spec. Writes --json. Needs `pip install llama-cpp-python` (not a kvforge dependency).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village by the sea, there lived",
]


def transformers_greedy(export: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            tokens = torch.tensor([ids])
            # No end-of-sequence token: llama.cpp's generator does not stop at one, and min_new_tokens would
            # instead mask it out of the argmax (a different greedy sequence).
            generated = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new_tokens,
                                       do_sample=False, eos_token_id=[], pad_token_id=0)
            out.append(generated[0, len(ids):].tolist())
    return out


def llamacpp_greedy(gguf: Path, prompts: list[list[int]], new_tokens: int, n_ctx: int) -> tuple[list[list[int]], str]:
    import contextlib
    import io
    import os

    from llama_cpp import Llama

    # llama.cpp logs through C stderr; capture it for the KV cache size it reports.
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "llamacpp_load.log"
    saved = os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=True, seed=0)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    out = []
    with contextlib.redirect_stderr(io.StringIO()):
        for ids in prompts:
            llm.reset()
            tokens = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                tokens.append(int(token))
                if len(tokens) == new_tokens:
                    break
            out.append(tokens)
    return out, log_path.read_text()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True, help="a stock export directory")
    parser.add_argument("--gguf", type=Path, required=True, help="its llama.cpp conversion (f32)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--n-ctx", type=int, default=4096, help="context llama.cpp allocates its KV cache for")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.export)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    started = time.perf_counter()
    ours = transformers_greedy(args.export, prompts, args.new_tokens)
    theirs, load_log = llamacpp_greedy(args.gguf, prompts, args.new_tokens, args.n_ctx)
    rows = []
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        agree = sum(x == y for x, y in zip(a, b))
        rows.append({"prompt": prompt, "agree": agree, "of": len(a), "first_difference": first_diff,
                     "transformers": tokenizer.decode(a), "llama_cpp": tokenizer.decode(b)})
        print(f"{agree}/{len(a)} tokens agree (first difference at {first_diff}): {prompt[:40]!r}")
    config = json.loads((args.export / "config.json").read_text())
    spec = json.loads((args.export / "kvforge_export.json").read_text()) if (args.export / "kvforge_export.json").is_file() else {}
    kv_line = next((line.strip() for line in load_log.splitlines()
                    if re.search(r"KV (self |buffer )?size|kv_cache.*(size|MiB)", line) and "model_loader" not in line), None)
    result = {"export": str(args.export), "gguf": str(args.gguf), "architecture": config.get("architectures"),
              "num_key_value_heads": config.get("num_key_value_heads"), "n_ctx": args.n_ctx,
              "llama_cpp_kv_log": kv_line, "export_record": spec, "prompts": rows,
              "all_agree": all(r["agree"] == r["of"] for r in rows), "seconds": round(time.perf_counter() - started, 1)}
    print(f"llama.cpp KV cache: {kv_line}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
