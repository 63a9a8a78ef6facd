"""Registers, shared memory and loop instructions of the GQA decode kernel (kernels/gqa_decode.py) for an H100/H200
(sm_90), compiled on a machine without a GPU (kernel_resources.py's method and helpers; compile with the GPU
image's Triton, 3.6.0 in session 25, whose counts the results quote):

    PYTHONPATH=/tmp/t36 python benchmarks/gqa_kernel_resources.py          # sessions 25-26's table

Rows: SmolLM2's head (64 dims, 3 query heads a KV head, padded to 16 rows) over a bf16 cache and over an 8-bit one
with float16 products, with its score product in int8 (int8_scores), then with its mask bytes and scales a tile
ahead (prefetch_slots) and under a 128-register cap (max_registers; both session 26, untimed); 128-slot tiles over 4
warps, two stages (bf16's three since session 26 are not this table's).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_resources import compile_marked, print_rows  # noqa: E402
from kvforge.kernels import gqa_decode  # noqa: E402


def compile_gqa_kernel(*, bits: int, half_products: bool = False, int8_scores: bool = False,
                       prefetch_slots: bool = False, max_registers: int | None = None, block_s: int = 128,
                       num_warps: int = 4, num_stages: int = 2, capability: int = 90):
    """The kernel as gqa_decode_attention launches it for bf16 queries over a bf16 (bits 16), int8 or packed 4-bit
    cache under a generate() mask, integers specialised as Triton's launcher does (multiples of 16 marked so, the
    scales' slot stride of 1 a constant)."""
    fn = gqa_decode._gqa_decode_split_kernel
    constants = dict(HEAD_DIM=64, COLS=32 if bits == 4 else 64, BLOCK_G=16, BLOCK_S=block_s, LENGTH_IN_MEMORY=True,
                     HAS_VALID=True, HAS_SCALES=bits < 16, HALF_PRODUCTS=half_products and bits == 8,
                     INT8_SCORES=int8_scores and half_products and bits == 8, PACKED=bits == 4,
                     PREFETCH_SLOTS=prefetch_slots,
                     stride_kss=1, stride_vss=1)
    cache = {8: "*i8", 4: "*u8", 16: "*bf16"}[bits]
    pointers = dict(Q="*bf16", K=cache, V=cache, LENGTH="*i32", VALID="*u8", K_SCALE="*bf16", V_SCALE="*bf16",
                    ACC="*fp32", MAX="*fp32", SUM="*fp32")
    return compile_marked(fn, constants, pointers, lambda name: name in {"slots", "slots_per_split"} or (
        name.startswith("stride") and name != "stride_qg"), num_warps, num_stages, max_registers, capability)

ROWS = [  # (label, settings)
    ("bf16", dict(bits=16)),
    ("8-bit, float16 products", dict(bits=8, half_products=True)),
    ("8-bit, int8 scores", dict(bits=8, half_products=True, int8_scores=True)),
    ("8-bit, int8 scores, mask bytes and scales a tile ahead",
     dict(bits=8, half_products=True, int8_scores=True, prefetch_slots=True)),
    ("8-bit, the same, 128 registers", dict(bits=8, half_products=True, int8_scores=True, prefetch_slots=True,
                                            max_registers=128)),
    ("4-bit (Triton's conversion)", dict(bits=4)),
]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, bf16 queries, 128-slot tiles")
    print_rows(ROWS, compile_gqa_kernel, "cache")

if __name__ == "__main__":
    main()
