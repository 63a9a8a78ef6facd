#!/usr/bin/env python
"""Export a model for `transformers`: `python launch/export.py (--run DIR | --checkpoint DIR | --model NAME) --out DIR`.

  --run DIR         a training run: its newest complete checkpoint, in the architecture of its config.yaml
  --checkpoint DIR  one checkpoint step (<run>/checkpoints/step_N); ZeRO of any stage is consolidated and LoRA
                    adapters (a run that used peft) are merged
  --model NAME      anything kvforge loads: a Hugging Face or KVForge directory, a hub id, a .gguf file,
                    smollm2-135m-instruct

The directory holds safetensors (sharded past --max-shard-size), config.json with the whole compression
spec, the tokenizer, a generation config, the bundled modeling code (KVForge models load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, no kvforge needed), README.md (model
card: method, KV bytes/token against the original, --eval results) and kvforge_export.json (sha256 of
every file). It is written to .DIR.tmp-<pid> beside DIR, verified, then renamed: DIR is complete or absent.

--format auto (default) writes a stock transformers class (LlamaForCausalLM, Qwen2ForCausalLM) instead when the
compressed layout maps onto one exactly -- checked on logits and greedy tokens before writing -- so it loads with
plain `AutoModelForCausalLM.from_pretrained(DIR)` and serving engines run it; --format stock insists (or exits 2
naming the layer and field with no stock equivalent); --format kvforge always writes the kvforge class.

Examples:
  python launch/export.py --run runs/smollm2-recover --out exports/smollm2-recover
  python launch/export.py --model runs/compressed/mixattention --out exports/mix --pyramid-budget 256 \\
      --eval passkey.json
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run directory")
    source.add_argument("--checkpoint", help="a checkpoint directory (<run>/checkpoints/step_N)")
    source.add_argument("--model", help="a model directory, hub id, .gguf file or smollm2-135m-instruct")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside the --model directory or hub repo")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="weight dtype of the export (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    parser.add_argument("--format", choices=("auto", "kvforge", "stock"), default="auto",
                        help="auto: a stock transformers class (Llama, Qwen2) where the compressed layout maps onto "
                             "one exactly, checked on logits and greedy tokens before writing, else the kvforge "
                             "class; kvforge: always the kvforge class (remote code); stock: the stock class or a "
                             "one-line refusal naming the layer and field (docs/INFERENCE.md; default: %(default)s)")
    parser.add_argument("--measure-tokens", type=int, default=64,
                        help="positions of the generate() whose allocated cache is measured and checked against "
                             "the spec's arithmetic (KVForge models; 0 skips; default: %(default)s)")
    parser.add_argument("--eval", action="append", default=[], metavar="JSON",
                        help="a launch/evaluate.py --json result to show in the model card (repeatable)")
    pyramid = parser.add_argument_group("PyramidKV default", "stored as compression.inference.pyramid")
    pyramid.add_argument("--pyramid-budget", type=int, default=None, help="average tokens kept per layer")
    pyramid.add_argument("--pyramid-schedule", choices=("pyramid", "uniform"), default="pyramid")
    pyramid.add_argument("--pyramid-window", type=int, default=8, help="observation window (default: 8)")
    pyramid.add_argument("--pyramid-pooling", choices=("avgpool", "maxpool", "none"), default="avgpool")
    pyramid.add_argument("--pyramid-kernel", type=int, default=None, help="pooling kernel, odd (default: 7)")
    pyramid.add_argument("--pyramid-beta", type=float, default=None,
                         help="top layer gets 1/beta of the average selectable budget (default: 20, the paper's)")
    pyramid.add_argument("--pyramid-sinks", type=int, default=None, help="first tokens always kept (default: 4)")
    args = parser.parse_args(argv)

    from kvforge.models.export import ExportError, export_pretrained, read_evaluations
    from kvforge.trainer.export_run import export_checkpoint, export_run

    pyramid_settings = None
    if args.pyramid_budget is not None:
        chosen = {"budget": args.pyramid_budget, "schedule": args.pyramid_schedule, "window": args.pyramid_window,
                  "pooling": args.pyramid_pooling, "kernel_size": args.pyramid_kernel, "beta": args.pyramid_beta,
                  "sinks": args.pyramid_sinks}
        pyramid_settings = {name: value for name, value in chosen.items() if value is not None}
    try:
        options = dict(out_dir=args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite, pyramid=pyramid_settings, evaluations=read_evaluations(args.eval),
                       measure_tokens=args.measure_tokens, format=args.format)
        if args.run:
            result = export_run(args.run, **options)
        elif args.checkpoint:
            result = export_checkpoint(args.checkpoint, **options)
        else:
            result = export_pretrained(args.model, gguf_file=args.gguf_file, **options)
    except ExportError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    kv = result.kv_cache
    print(json.dumps({"out": str(result.out_dir), "files": result.files, "kvforge": result.kvforge,
                      "architecture": "KVForgeForCausalLM" if result.kvforge else _architecture(result.out_dir),
                      "num_parameters": result.num_parameters, "dtype": result.dtype,
                      "kv_bytes_per_token": kv["bytes_per_token"], "original_kv_bytes_per_token":
                      kv["original_bytes_per_token"], "seconds": round(result.seconds, 1)}, indent=2))
    return 0


def _architecture(out_dir) -> str:
    from pathlib import Path

    return ",".join(json.loads((Path(out_dir) / "config.json").read_text()).get("architectures") or ["?"])


if __name__ == "__main__":
    sys.exit(main())
