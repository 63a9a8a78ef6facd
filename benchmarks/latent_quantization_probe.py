"""Does a latent of twice the rank stored in 8 bits beat a bf16 latent at the same bytes? A probe before building it.

    python benchmarks/latent_quantization_probe.py --heldout /usr/share/games/fortunes [--budgets 0.5 0.25]

For each budget, surgery builds the pre-RoPE latent model the recovery recipes start from (configs/recovery/
lowrank-<budget>.yaml's compression, calibrated on the standard library's docstrings), and perplexity on the held-out
prose's eval split is measured with the cached latents (k_down / v_down outputs, what KVForgeCache stores) as they
are and rounded through low-bit formats with one scale per token and tensor (absmax): float8 e4m3, int8, int4. No
training: this compares starting points. A 50%-rank latent in 8 bits takes the bytes of a 25%-rank one in bf16 (plus
the scales: 2 bytes per token, layer and tensor, 120 B/token for SmolLM2 against its 5,760).
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from kvforge.models.loading import document_separator_id, load_pretrained
from kvforge.models.surgery import compress
from kvforge.trainer.calibration_rows import load_calibration_rows
from kvforge.trainer.config import load_config
from kvforge.trainer.data import build_packed_datasets
from kvforge.trainer.evaluation import evaluate_perplexity


BITS = {"fp8_e4m3": 8, "int8": 8, "int4": 4}


def round_per_token(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [..., R] through a low-bit format with one absmax scale per vector of R (per token), back in x's dtype."""
    amax = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12)
    if fmt == "fp8_e4m3":
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
    if fmt in ("int8", "int4"):
        top = 2 ** (BITS[fmt] - 1) - 1
        scale = amax / top
        return ((x.float() / scale).round().clamp(-top, top) * scale).to(x.dtype)
    raise ValueError(f"format must be one of {', '.join(BITS)}, got {fmt!r}")


@contextmanager
def latents_rounded(model: torch.nn.Module, fmt: str | None):
    """Every k_down / v_down output (the cached pre-RoPE latents) rounded through `fmt` while inside."""
    handles = []
    if fmt is not None:
        for name, module in model.named_modules():
            if name.endswith(("self_attn.k_down", "self_attn.v_down")):
                handles.append(module.register_forward_hook(lambda m, args, out: round_per_token(out, fmt)))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heldout", required=True, help="held-out prose (a folder of text files)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--formats", nargs="+", default=["fp8_e4m3", "int8"], choices=list(BITS))
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_pretrained(args.model, dtype="float32")
    separator = document_separator_id(tokenizer, base.config)
    rows = build_packed_datasets({"source": args.heldout, "seq_len": args.seq_len, "eval_fraction": 0.1},
                                 tokenizer, separator, show_progress=False).eval[:args.eval_rows]

    def perplexity(model) -> float:
        with torch.no_grad():
            return evaluate_perplexity(model, rows, batch_size=1, device="cpu")["perplexity"]

    print(f"held-out: {rows.shape[0]} rows x {rows.shape[1]} tokens of {args.heldout} (eval split)")
    print(f"original: perplexity {perplexity(base):.2f}")
    calibration = load_calibration_rows(tokenizer, separator, source="stdlib-docstrings",
                                        tokens=args.calibration_tokens, seq_len=args.seq_len, show_progress=False)
    for budget in args.budgets:
        cfg = load_config("configs/recovery/lowrank-25.yaml", [f"compression.arguments.budget={budget}"])
        result = compress(base, cfg.compression.spec_for(base.config), calibration,
                          settings=cfg.compression.surgery)
        model, spec = result.model.eval(), result.spec
        bf16_bytes = spec.kv_cache_bytes_per_token(num_kv_heads=base.config.num_key_value_heads,
                                                   head_dim=base.config.head_dim, dtype="bfloat16")
        scales = 2 * 2 * base.config.num_hidden_layers  # one bf16 scale per token, layer and tensor
        print(f"budget {budget}: bf16 latents {bf16_bytes:,.0f} B/token: perplexity {perplexity(model):.2f}")
        for fmt in args.formats:
            with latents_rounded(model, fmt) as hooked:
                assert hooked == 2 * base.config.num_hidden_layers, hooked
                stored = bf16_bytes * BITS[fmt] / 16 + scales
                print(f"budget {budget}: {fmt} latents {stored:,.0f} B/token "
                      f"({stored / result.report['original_kv_bytes_per_token']:.1%} of the original): "
                      f"perplexity {perplexity(model):.2f}")
        del model, result


if __name__ == "__main__":
    main()
