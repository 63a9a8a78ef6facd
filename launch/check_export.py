"""Check exported kvforge directories under the transformers installed here, without kvforge.

    python -I launch/check_export.py EXPORT_DIR [EXPORT_DIR ...] [--device cuda] [--dtype bfloat16] [--json out.json]

What users meet when their transformers differs from the one an export was made with (transformers 5.24 renamed
the argument generate() passes the cache under, and exported models decoded garbage while their training and
uncached forwards stayed right). For each directory, loaded as remote code exactly as a user loads it:
  - cached greedy decoding picks the tokens the uncached model prefers (batch of two, left padding) and the
    cache generate() filled holds the bytes the spec's arithmetic says (`check_cached_decoding`, which ships in
    the exported modeling file);
  - the tokenizer round-trips and a plain generate() from text runs;
  - a PyramidKV default in the config compacts the cache of a plain generate() below the full cache.
Prints one line per directory naming the transformers version; exits 1 on the first failure, naming it.

Imports only torch and transformers: run it with `python -I` from any folder (`make compat` does, in venvs where
kvforge is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_directory(directory: Path, device: str = "cpu", dtype: str = "auto") -> dict:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=DTYPES[dtype])
    model = model.to(device).eval()
    modeling = sys.modules[type(model).__module__]
    if not hasattr(modeling, "check_cached_decoding"):
        raise RuntimeError(f"{directory} was exported before kvforge bundled check_cached_decoding; re-export it")
    result = {"directory": str(directory), "dtype": str(model.dtype).removeprefix("torch."),
              "kernels": getattr(modeling, "fused_attention", None) is not None,
              "decoding": modeling.check_cached_decoding(model)}

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    inputs = tokenizer("The capital of France is", return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    result["text"] = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    cache = modeling.generated_cache(out)
    if type(cache).__name__ != "KVForgeCache":
        raise RuntimeError(f"a plain generate() decoded with {type(cache).__name__}, not the model's KVForgeCache")

    pyramid = (model.config.compression or {}).get("inference", {}).get("pyramid")
    if pyramid:
        prompt = torch.randint(3, model.config.vocab_size, (1, 4 * pyramid["budget"]),
                               generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=0)
        cache = modeling.generated_cache(out)
        full = model.config.kv_cache_bytes(cache.get_seq_length(), model.dtype)
        if cache.pyramid is None or not cache.pyramid.compacted or cache.cache_bytes() >= full:
            raise RuntimeError(f"the PyramidKV default {pyramid} did not compact a plain generate()'s cache "
                               f"({cache.cache_bytes()} bytes, the full cache holds {full})")
        result["pyramid"] = {"bytes": cache.cache_bytes(), "full_bytes": full}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", type=Path, nargs="+")
    parser.add_argument("--device", default="cpu", help="where to run the model (default: cpu; e.g. cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="load the weights in this dtype (default: auto, as exported)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("kvforge") is not None:  # the export must stand on its own
        print("error: kvforge is importable here; run with `python -I` where kvforge is not installed",
              file=sys.stderr)
        return 2
    version = transformers.__version__
    transformers.utils.logging.disable_progress_bar()  # one line per directory is the output
    results = []
    for directory in args.directories:
        try:
            result = check_directory(directory, args.device, args.dtype)
        except Exception as error:  # one line naming the version, the directory and what broke
            print(f"compat: transformers {version}: {directory.name}: FAILED: {type(error).__name__}: {error}")
            return 1
        decoding = result["decoding"]
        line = (f"compat: transformers {version}: {directory.name} ({args.device}, {result['dtype']}): ok: "
                f"cached == uncached greedy over "
                f"{decoding['rows']} x {decoding['steps']} steps (max margin {decoding['max_margin']:.2g}), cache "
                f"{decoding['cache_bytes']} bytes == spec")
        if "pyramid" in result:
            line += f", PyramidKV default {result['pyramid']['bytes']} < {result['pyramid']['full_bytes']} bytes"
        print(line, flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps({"transformers": version, "torch": torch.__version__,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
