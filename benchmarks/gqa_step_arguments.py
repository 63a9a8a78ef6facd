"""What a static-cache decode step hands the GQA kernel over an 8-bit cache, on the CPU (Triton's interpreter):
each launch's query, keys, scales and mask with their shapes, strides, dtypes and data pointers modulo 16, to set
beside launch/benchmark_decode.py's --part gqa case (session 26: the kernel took 110.8 us a layer inside
generate() at 128 x 4k and 92.6 us in its table; these arguments match the table's in layout):

    TRITON_INTERPRET=1 KVFORGE_KERNELS=triton python benchmarks/gqa_step_arguments.py

A two-layer model of the tests' shape (tests/models/test_modeling_kvforge.py's build), fp16, K and V in 8 bits."""
import os
import sys
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("KVFORGE_KERNELS") != "triton":
    sys.exit("set TRITON_INTERPRET=1 and KVFORGE_KERNELS=triton (the kernel through the interpreter on the CPU)")
root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "tests" / "models"), str(root / "tests")]
from test_modeling_kvforge import build  # noqa: E402

from kvforge.kernels import dispatch  # noqa: E402

launch = dispatch.gqa_decode_attention


def described(name, tensor):
    return (f"{name} {tuple(tensor.shape)} strides {tensor.stride()} {tensor.dtype} "
            f"pointer % 16 = {tensor.data_ptr() % 16}")


def spy(query, keys, values, length, scaling, valid=None, k_scale=None, v_scale=None, **settings):
    print("; ".join(described(name, tensor) for name, tensor in (
        ("query", query), ("keys", keys), ("values", values), ("k_scale", k_scale), ("v_scale", v_scale),
        ("valid", valid)) if tensor is not None) + f"; length {length}; settings {settings}")
    return launch(query, keys, values, length, scaling, valid=valid, k_scale=k_scale, v_scale=v_scale, **settings)


dispatch.gqa_decode_attention = spy
model = build([{"cache_bits": 8}] * 2).to(torch.float16)
ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
cache = model.static_cache(24 + 4, cuda_graphs=False)
with torch.no_grad():
    model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache)  # prefill: not the kernel
    model(input_ids=ids[:, -1:], attention_mask=torch.ones(2, 25, dtype=torch.long),
          position_ids=torch.tensor([[24], [24]]), cache=cache)
