"""Registers, shared memory and loop instructions of the partial-RoPE decode kernel for an H100/H200 (sm_90),
compiled on a machine without a GPU (kernel_resources.py's method and helpers; its docstring says how to compile
with the GPU image's Triton, 3.6.0 in session 23, whose counts are the ones the results quote):

    PYTHONPATH=/tmp/t36 python benchmarks/partial_kernel_resources.py          # sessions 23-26's table

Rows: the trained 8-bit layout (rank 96 beside 3 x 32 rotary dims) with Triton's conversion, with half_products
over slot rows and over head rows (its default since session 24), then session 26's steps (int8 rotary scores,
split columns, scales a tile ahead, the 128-register cap: the defaults since, less the scales for Kr = 3); and the
bf16 layout of rank 128 beside 3 x 16. SmolLM2's 9 query heads in one block of 16, the mask bytes a tile ahead,
64-slot tiles over 4 warps, two stages.
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
from kvforge.kernels import partial_rope_decode  # noqa: E402


def compile_partial_kernel(*, bits: int, rank: int, rope_dim: int, half_products: bool = False,
                           int8_scores: bool = False, split_columns: bool = False, prefetch_scales: bool = False,
                           max_registers: int | None = None, slot_rows: bool = True,
                           rope_heads: int = 3, block_s: int = 64,
                           num_warps: int = 4, num_stages: int = 2, capability: int = 90):
    """The kernel as partial_rope_decode_attention launches it for bf16 queries over a bf16 (bits 16) or int8
    cache, integers specialised as Triton's launcher does (multiples of 16 marked so, the scales' slot stride of 1
    a constant)."""
    fn = partial_rope_decode._partial_rope_decode_kernel
    block_r, block_r2 = partial_rope_decode.tile_widths(rank, split_columns)
    constants = dict(ROPE_DIM=rope_dim, BLOCK_H=16, BLOCK_R=block_r, BLOCK_R2=block_r2,
                     ACC_WIDTH=partial_rope_decode._next_power_of_2(rank),
                     BLOCK_C=partial_rope_decode._next_power_of_2(rope_heads * rope_dim), BLOCK_S=block_s,
                     HAS_VALID=True, LENGTH_IN_MEMORY=False, SLOT_ROWS=slot_rows, PREFETCH_SLOTS=True,
                     PREFETCH_SCALES=prefetch_scales,
                     HAS_SCALES=bits == 8, HALF_PRODUCTS=half_products and bits == 8,
                     INT8_SCORES=int8_scores and half_products and bits == 8, stride_lss=1, stride_rss=1)
    cache = "*i8" if bits == 8 else "*bf16"
    pointers = dict(Q_LAT="*bf16", Q_ROPE="*bf16", LATENT=cache, K_ROPE=cache, VALID="*u8", LENGTH="*i32",
                    LATENT_SCALE="*bf16", ROPE_SCALE="*bf16", ACC="*fp32", MAX="*fp32", SUM="*fp32")
    # Integers that are multiples of 16 at SmolLM2's shapes (the launcher marks them so); the rest are not.
    multiples_of_16 = {"rank", "slots", "padded_heads", "slots_per_split"}
    return compile_marked(fn, constants, pointers, lambda name: name in multiples_of_16 or (
        name.startswith("stride") and name != "stride_qlg"), num_warps, num_stages, max_registers, capability)

ROWS = [  # (label, settings)
    ("8-bit, Triton's conversion", dict(bits=8, rank=96, rope_dim=32)),
    ("8-bit, half_products, slot rows", dict(bits=8, rank=96, rope_dim=32, half_products=True)),
    ("8-bit, half_products, head rows", dict(bits=8, rank=96, rope_dim=32, half_products=True, slot_rows=False)),
    ("8-bit, half_products, head rows, int8 rotary scores",
     dict(bits=8, rank=96, rope_dim=32, half_products=True, slot_rows=False, int8_scores=True)),
    ("8-bit, half_products, slot rows, int8 rotary scores",
     dict(bits=8, rank=96, rope_dim=32, half_products=True, int8_scores=True)),
    ("8-bit, half_products, head rows, int8 rotary scores, split columns (64 + 32)",
     dict(bits=8, rank=96, rope_dim=32, half_products=True, slot_rows=False, int8_scores=True, split_columns=True)),
    ("8-bit, the same, scales a tile ahead", dict(bits=8, rank=96, rope_dim=32, half_products=True, slot_rows=False,
                                                  int8_scores=True, split_columns=True, prefetch_scales=True)),
    ("8-bit, head rows, int8 rotary scores, split columns, 128 registers (the defaults at Kr = 3)",
     dict(bits=8, rank=96, rope_dim=32, half_products=True, slot_rows=False, int8_scores=True, split_columns=True,
          max_registers=128)),
    ("bf16, rank 128 + 3 x 16", dict(bits=16, rank=128, rope_dim=16)),
]


# --cap-sweep: the 8-bit defaults (head rows, int8 rotary scores, split columns) at wider tiles, without and with the
# 128-register cap: where the cap spills (the launcher caps only tiles of at most 128 latent and rotary columns).
CAP_SWEEP = [(f"8-bit, rank {rank} + {heads} x {dim}{', 128 registers' if cap else ''}",
              dict(bits=8, rank=rank, rope_dim=dim, rope_heads=heads, half_products=True, slot_rows=False,
                   int8_scores=True, split_columns=True, max_registers=cap))
             for rank, dim, heads in ((96, 32, 3), (192, 32, 3), (256, 64, 1)) for cap in (None, 128)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap-sweep", action="store_true", help="the register cap's rows at wider tiles instead")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, bf16 queries")
    print_rows(CAP_SWEEP if args.cap_sweep else ROWS, compile_partial_kernel, "layout")

if __name__ == "__main__":
    main()
