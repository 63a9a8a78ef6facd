"""Write the tiny exports that `make compat` checks under other transformers releases (launch/check_export.py).

    python tests/compat/write_exports.py OUT_DIR

Random-weight SmolLM2-shaped miniatures (the real tokenizer, 4-6 layers), float32, one per cache representation
family: every method in one model (its latent layer cached in 8 bits), MLA-style partial RoPE, and a PyramidKV
export-time default. Exporting runs
export's own checks under this environment's transformers first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.export import export_model
from kvforge.models.loading import load_tokenizer
from kvforge.models.modeling_kvforge import KVForgeForCausalLM

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, vocab_size=49152, initializer_range=0.1, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
EXPORTS = {
    # a latent layer in 8 bits, a window with sinks over merged heads in 4 bits, its KV-sharing reader, a
    # shared-attention reader
    "all-methods": {"layers": [
        {"kv_proj": "low_rank", "k_rank": 12, "v_rank": 12, "rope": "pre_rope_latent", "cache_bits": 8},
        {"attention": "window", "window": 16, "sinks": 2, "kv_proj": "merged_heads", "num_kv_heads": 1, "cache_bits": 4},
        {"attention": "window", "window": 16, "sinks": 2, "kv_from": 1},
        {"probs_from": 0},
    ]},
    "partial-rope": {"layers": [
        {"kv_proj": "low_rank", "kv_rank": 24, "rope": "partial", "rope_dims": 4},
        {"kv_proj": "low_rank", "kv_rank": 24, "rope": "partial", "rope_dims": 4},
        {},
        {"attention": "window", "window": 8, "sinks": 1},
    ]},
    "pyramid-default": {"layers": [{}, {}, {}, {}]},
}
PYRAMID = {"pyramid-default": {"budget": 24, "sinks": 2}}


def main(out_dir: str) -> None:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    for name, compression in EXPORTS.items():
        torch.manual_seed(0)
        config = KVForgeConfig(**TINY, num_hidden_layers=len(compression["layers"]), compression=compression)
        model = KVForgeForCausalLM(config).eval()
        result = export_model(model, tokenizer, Path(out_dir) / name, dtype="float32", overwrite=True,
                              pyramid=PYRAMID.get(name))
        print(f"wrote {result.out_dir} (decoding check under this transformers: ok)")


if __name__ == "__main__":
    main(sys.argv[1])
