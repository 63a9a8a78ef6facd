"""The GQA kernel's error over an 8-bit cache against unquantized attention, on this CPU through Triton's
interpreter, with its score product in float16 (int8_scores=0) and in int8 (the default), beside the 8-bit cache's
own rounding (float64 attention over the values the cache holds):

    TRITON_INTERPRET=1 python benchmarks/int8_scores_error.py           # session 25's figures

SmolLM2's head (64 dims, 3 KV heads of 3 query heads), batch 2, 512 slots, float16 queries and caches of standard
normal values; queries 1x and 3x as large (sharper attention). Errors are relative (Frobenius) to float64 attention
over the unquantized keys and values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 in the environment (the kernel runs on CPU tensors through the interpreter)")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvforge.kernels.gqa_decode import gqa_decode_attention  # noqa: E402
from kvforge.models.modeling_kvforge import dequantize_slots, kv_attention, quantize_slots  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    batch, kv_heads, group, dim, slots = 2, 3, 3, 64, 512
    mask = torch.ones(batch, 1, 1, 1, slots, dtype=torch.bool)

    def attention(query, keys, values):  # float64 over the given keys and values
        return kv_attention(query.double()[:, :, :, None], keys.double(), values.double(), mask, dim ** -0.5)[0][
            :, :, :, 0]

    for sharpness in (1.0, 3.0):
        query = (torch.randn(batch, kv_heads, group, dim) * sharpness).to(torch.float16)
        keys, values = (torch.randn(batch, kv_heads, slots, dim).to(torch.float16) for _ in range(2))
        exact = attention(query, keys, values)
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(keys, 2), quantize_slots(values, 2)

        def error(out):
            return ((out.double() - exact).norm() / exact.norm()).item()

        cache = error(attention(query, dequantize_slots(k_q, k_scale.double()),
                                dequantize_slots(v_q, v_scale.double())))
        kernel = {scores: error(gqa_decode_attention(query, k_q, v_q, None, dim ** -0.5, splits=2, block_s=64,
                                                     k_scale=k_scale, v_scale=v_scale, int8_scores=scores))
                  for scores in (0, 1)}
        print(f"queries x{sharpness:g}: the int8 cache in float64 {cache:.2e}, the kernel with float16 scores "
              f"{kernel[0]:.2e}, with int8 scores {kernel[1]:.2e}", flush=True)


if __name__ == "__main__":
    main()
