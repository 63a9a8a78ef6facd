"""Decode benchmarks on a GPU: the fused pre-RoPE latent kernel against the PyTorch path and against SDPA on the
uncompressed cache, per layer and through generate().

  python launch/benchmark_decode.py --json decode.json                 # both parts
  python launch/benchmark_decode.py --part kernel --batch 64 --context 4096

Part `kernel`, one attention layer of SmolLM2's shape (9 query heads, 3 KV heads, head_dim 64, bf16), one
decode token per row, B rows x S cached positions:
    sdpa_full     F.scaled_dot_product_attention over the original GQA cache (K, V: B x 3 x S x 64), what
                  transformers runs for the uncompressed model
    torch_latent  modeling_kvforge's PyTorch path over the latents (rebuilds and rotates every key; its cos/sin
                  tables prebuilt, as the model shares them across layers)
    triton_latent kernels/latent_attention.py over the same latents (--cache-bits: read as int8 or packed 4-bit
                  bytes with their scales; one column per combination of the launch settings swept, KERNEL_SWEEP,
                  e.g. triton_latent_kv1_sr0)
with the bytes each must read (the floor at the device's copy bandwidth) and each kernel column's error against
the float64 reference (`--part latent`: this table alone). Ranks default to the mean of the low-rank 50% SmolLM2
export (k 48, v 144: 192 of the original's 384 numbers per token and layer). Then the same layer over a
partial-RoPE joint latent (MHA2MLA;
--kv-rank R, --rope-dims Dr rotary key dims per head, default 128 and 16: 176 of 384 numbers per token), with
a rotary key per KV head (Kr = 3) and one shared by all heads (Kr = 1, DeepSeek MLA's layout):
    torch_partial   modeling_kvforge's partial_rope_attention, absorbed (what KVFORGE_KERNELS=off runs)
    triton_partial  kernels/partial_rope_decode.py
reading B x S x ((R + Kr x Dr) x 2 + 1) bytes (latent, rotary keys, mask); `--part partial` runs only these.

Part `gqa`: the dense GQA kernel (kernels/gqa_decode.py: the original layout, merged heads, windows) against SDPA
and kvforge's PyTorch path (torch_kv: modeling_kvforge.kv_attention, what KVFORGE_KERNELS=off runs, with the
decode mask) on the same bf16 cache, and over a low-bit one (int8 keys and values, a scale per slot each,
--half-products 0 1 for both conversions; or with --cache-bits 4 their packed bytes), each at its fraction of the
copy bandwidth on the bytes it reads.

Part `generate`, SmolLM2-135M's architecture with random bf16 weights (decode speed does not depend on
their values): the original Llama (transformers, SDPA) against the low-rank 50% spec
(docs/results/exports-cpu/lr50.compress.json) with KVFORGE_KERNELS=off and =auto; decode tokens/s from the
time of generate(N + 1 tokens) minus generate(1 token), and the cache bytes each allocates.

Its rows (GENERATE_VARIANTS, --gen-variants) also cover the 25% and 12.5% recipes' low-bit caches, window and
MixAttention layouts, and the GQA kernel on dense caches; --profile N adds a torch.profiler table per row.
Part `max-batch`: the largest batch each row's generate() fits at --gen-prompt tokens.

Timings: triton.testing.do_bench medians (kernel part); CUDA-synchronized wall clock, median of --repeats
(generate part). Needs CUDA.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LR50_SPEC = REPO / "docs" / "results" / "exports-cpu" / "lr50.compress.json"
LR25_INT8_SPEC = REPO / "docs" / "results" / "int8-cache-cpu" / "b0.25-8.json"
LR12_INT4_SPEC = REPO / "docs" / "results" / "int8-cache-cpu" / "b0.125-4-balanced.json"
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


# (flag, latent_decode_attention's argument, column tag, what the values mean): --kernel part sweeps. Binary layout
# choices take 0 (off) or 1 (on); a value of 0 elsewhere means the kernel's own choice.
KERNEL_SWEEP = [
    ("--kv-per-program", "kv_per_program", "kv", "KV heads per program (1: a program per KV head; 0: all)"),
    ("--programs-per-sm", "programs_per_sm", "pps", "the programs the slot splits aim at per SM (the partial "
     "and gqa parts too)"),
    ("--block-s", "block_s", "bs", "slots per tile (the partial and gqa parts too)"),
    ("--num-warps", "num_warps", "w", "warps per program (the partial and gqa parts too)"),
    ("--num-stages", "num_stages", "st", "software-pipelining stages (the partial and gqa parts too)"),
    ("--prefetch", "prefetch", "pf", "1: the next tile's loads issued before this tile's dots, 0: not"),
    ("--prefetch-slots", "prefetch_slots", "ps", "1: the next tile's positions, mask and scales loaded a tile ahead, "
     "0: with the tile (the partial part too: its mask bytes; the gqa part: its mask bytes and scales)"),
    ("--split-columns", "split_columns", "sc", "1: a program's key columns (the partial part: its latent's) as two "
     "power-of-two tiles where one would be padded, 0: one tile"),
    ("--split-values", "split_values", "sv", "1: the value latent's columns likewise, 0: one tile"),
    ("--slot-rows", "slot_rows", "sr", "1: the tile's slots as the rows of the score and value products, 0: the "
     "query heads (the partial part too)"),
    ("--word-loads", "word_loads", "wl", "1: 8- or 4-bit latents read as 32-bit words and made float16 in registers, "
     "0: Triton's byte loads and conversion"),
    ("--merged-halves", "merged_halves", "mh", "1: a key column group's two halves in one key product and one score "
     "product (slot rows), 0: two each"),
    ("--half-rope-table", "half_rope_table", "hr", "1: the cos/sin table in float16, 0: float32"),
    ("--fused-values", "fused_values", "fv", "1: the splits' merge and the value up-projection in one kernel, 0: the "
     "merge kernel and a GEMM (the partial part too)"),
    ("--whole-waves", "whole_waves", "ww", "1: the slot splits stay within --programs-per-sm, 0: reach it (the "
     "partial and gqa parts too)"),
    ("--max-registers", "max_registers", "mr", "a cap on registers per thread (ptxas spills past it)"),
    ("--block-h", "block_h", "bh", "query heads per program (the partial part only)"),
    ("--prefetch-scales", "prefetch_scales", "pc", "1: an 8-bit cache's scales loaded a tile ahead, 0: with the tile "
     "(the partial part only)"),
    ("--half-products", "half_products", "hp", "1: an 8-bit cache's tiles made float16 by byte permutes and every "
     "product in float16, 0: Triton's conversion to the queries' dtype (the partial and gqa parts only)"),
    ("--int8-scores", "int8_scores", "is", "1: an 8-bit cache's score product in int8 on the keys' bytes (the partial "
     "part: the rotary keys'), the query rounded to int8 per head, 0: in float16 (the gqa and partial parts only)"),
]
PARTIAL_ONLY = ("block_h", "half_products", "prefetch_scales")
BINARY_SETTINGS = {"prefetch", "prefetch_slots", "prefetch_scales", "split_columns", "split_values", "slot_rows",
                   "word_loads", "merged_halves", "half_rope_table", "whole_waves", "fused_values", "half_products",
                   "int8_scores"}


def kernel_columns(args, arguments=None) -> list[tuple[str, dict]]:
    """(name, settings) per combination of the KERNEL_SWEEP values given (of `arguments` only, if named), named by
    the settings given, e.g. triton_latent_kv1_sr0; the kernel's own choice for the rest (unset, or 0 for a
    non-binary setting)."""
    sweep = [(tag, argument, getattr(args, argument)) for _, argument, tag, _ in KERNEL_SWEEP
             if arguments is None or argument in arguments]
    columns = []
    for values in itertools.product(*(options for _, _, options in sweep)):
        chosen = [(tag, argument, value) for (tag, argument, _), value in zip(sweep, values)
                  if value is not None and (value or argument in BINARY_SETTINGS)]
        columns.append(("triton_latent" + "".join(f"_{tag}{value}" for tag, _, value in chosen),
                        {argument: value for _, argument, value in chosen}))
    return columns


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("kernel", "latent", "partial", "gqa", "generate", "max-batch", "both"),
                        default="both",
                        help="kernel: both kernel tables; latent: only the pre-RoPE latent one; partial: only the "
                             "partial-RoPE one; gqa: the dense GQA kernel's, bf16 and --cache-bits 8 (default) or "
                             "4; max-batch: the largest batch generate() fits with --gen-prompt tokens, per "
                             "--gen-variants row")
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="kernel part: rows (default: a sweep)")
    parser.add_argument("--context", type=int, nargs="*", default=None, help="kernel part: cached positions")
    parser.add_argument("--k-rank", type=int, default=48)
    parser.add_argument("--v-rank", type=int, default=144)
    parser.add_argument("--cache-bits", type=int, choices=(16, 8, 4), default=16,
                        help="kernel and latent parts: latents in bf16, int8 or packed 4 bits (per-slot bf16 "
                             "scales), as a cache_bits model stores them; partial part: 16 or 8")
    # The latent kernel's launch settings: one triton_latent column per combination of the values given (the
    # partial part takes those of PARTIAL_SWEEP). Unset: the kernel's own choice.
    for flag, argument, _, what in KERNEL_SWEEP:
        parser.add_argument(flag, type=int, nargs="*", default=[None], metavar="N",
                            choices=(0, 1) if argument in BINARY_SETTINGS else None,
                            help=f"kernel part: one column per value: {what}")
    parser.add_argument("--via-export", type=Path, default=None, metavar="DIR",
                        help="generate part: each kvforge row's model is exported with kvforge's exporter into "
                             "DIR/<variant> and timed as AutoModelForCausalLM.from_pretrained(..., "
                             "trust_remote_code=True) loads it (the bundled modeling and kernel files), as a user "
                             "runs it; --latent-kernel does not reach that copy")
    parser.add_argument("--latent-kernel", nargs="*", default=[], metavar="KEY=N",
                        help="generate part: the latent kernel's launch settings for every row "
                             "(the keys of kernels/latent_attention.py's LAUNCH_DEFAULTS)")
    parser.add_argument("--partial-kernel", nargs="*", default=[], metavar="KEY=N",
                        help="generate part: the partial-RoPE kernel's launch settings for every row "
                             "(the keys of kernels/partial_rope_decode.py's LAUNCH_DEFAULTS)")
    parser.add_argument("--kv-rank", type=int, default=128, help="partial-RoPE joint latent rank")
    parser.add_argument("--rope-dims", type=int, default=16, help="partial-RoPE rotary key dims per head")
    parser.add_argument("--gen-batch", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--gen-prompt", type=int, default=4096)
    parser.add_argument("--gen-new", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                        help="generate and max-batch parts: prefill the prompt N tokens at a time (generate()'s "
                             "prefill_chunk_size), as a server does with long prompts, so that the prefill's "
                             "activations, not only the cache, stop growing with batch x prompt (0: one pass)")
    parser.add_argument("--gen-variants", nargs="*", default=list(GENERATE_VARIANTS), choices=tuple(GENERATE_VARIANTS),
                        help="generate part: which rows (GENERATE_VARIANTS)")
    parser.add_argument("--batch-start", type=int, default=8, metavar="B",
                        help="max-batch part: the first batch tried (doubled until one does not fit, then bisected)")
    parser.add_argument("--compile-step", action="store_true",
                        help="generate part: kvforge's static-cache rows compile their decode step "
                             "(KVForgeCache(compile_step=True): torch.compile before the CUDA graph)")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="generate part: a new KVForgeCache per generate() call, each capturing its CUDA graph "
                             "(default: one per cache length, reset() between calls, as transformers keeps its "
                             "StaticCache: the median of 3 repeats is then a replayed call's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="generate part: also profile a generate() of N new tokens per row (torch.profiler; the "
                             "ops by device time, prefill included, in the JSON's 'profile')")
    parser.add_argument("--l2", choices=("warm", "cold"), default="warm",
                        help="kernel parts: each column's replayed calls over one case again and again (warm), or "
                             "over copies of it in turn, so that none finds the last call's bytes in L2, as in a "
                             "model's step (cold; session 26: the same within 1%%)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# Kernel part


def kernel_case(batch, context, k_rank, v_rank, seed=0, kv_heads=3, group=3, dim=64, dtype=torch.bfloat16,
                device="cuda"):
    from torch import nn

    from kvforge.models.modeling_kvforge import KeyRotary

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    k_up = nn.Linear(k_rank, kv_heads * dim, bias=False, device=device, dtype=dtype)
    v_up = nn.Linear(v_rank, kv_heads * dim, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        k_up.weight.copy_(rand(kv_heads * dim, k_rank, scale=k_rank ** -0.5))
        v_up.weight.copy_(rand(kv_heads * dim, v_rank, scale=v_rank ** -0.5))
    positions = torch.arange(context, device=device)[None].expand(batch, -1).contiguous()
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    rotary = KeyRotary(positions, inv_freq, 1.0, dtype)
    rotary.tables()  # built once per step and shared by the layers in the model
    return dict(query=rand(batch, kv_heads, group, 1, dim), k_latent=rand(batch, context, k_rank),
                v_latent=rand(batch, context, v_rank), k_up=k_up, v_up=v_up, key_rotary=rotary,
                mask=torch.ones(batch, 1, 1, 1, context, dtype=torch.bool, device=device), scaling=dim ** -0.5,
                full_k=rand(batch, kv_heads, context, dim), full_v=rand(batch, kv_heads, context, dim))


def run_kernel_part(args, copy_bandwidth: float, device="cuda", timings=None, dtype=torch.bfloat16):
    """Rows of sdpa_full, torch_latent and triton_latent (one column per --kv-per-program) and the kernels' largest
    relative error against float64. `device`, `timings`, `dtype`: the CPU test of this code (Triton's interpreter,
    float16)."""
    timings = timings or functools.partial(cuda_timings, l2=args.l2)
    import torch.nn.functional as F

    from kvforge.kernels.latent_attention import latent_decode_attention
    from kvforge.models.modeling_kvforge import KeyRotary, pre_rope_latent_attention

    from kvforge.models.modeling_kvforge import dequantize_slots, quantize_slots

    def low_bit(c):
        """The case's latents as a cache_bits model stores them (k_q, v_q, scales), and their dequantized values
        for the PyTorch rows, so every row attends over the same numbers."""
        if args.cache_bits == 16:
            return c
        (k_q, k_scale), (v_q, v_scale) = (quantize_slots(c[n], 1, args.cache_bits) for n in ("k_latent", "v_latent"))
        return dict(c, k_q=k_q, v_q=v_q, k_scale=k_scale, v_scale=v_scale, k_latent=dequantize_slots(k_q, k_scale),
                    v_latent=dequantize_slots(v_q, v_scale))

    def triton_latent(c, settings):
        r = c["key_rotary"]
        quantized = "k_q" in c
        return latent_decode_attention(c["query"][:, :, :, 0], c["k_q" if quantized else "k_latent"],
                                       c["v_q" if quantized else "v_latent"], c["k_up"].weight, None,
                                       c["v_up"].weight, None, r.positions, c["mask"][:, 0, 0, 0], r.inv_freq,
                                       r.scaling, c["scaling"], max_position=r.max_position(),
                                       k_scale=c.get("k_scale"), v_scale=c.get("v_scale"), **settings)

    latent_settings = [argument for _, argument, _, _ in KERNEL_SWEEP
                       if argument not in PARTIAL_ONLY + GQA_LOW_BIT_SWEEP]
    kernels = [(name, functools.partial(triton_latent, settings=settings))
               for name, settings in kernel_columns(args, latent_settings)]

    def torch_latent(c):
        return pre_rope_latent_attention(c["query"], c["k_latent"], c["v_latent"], c["k_up"], c["v_up"],
                                         c["key_rotary"], c["mask"], c["scaling"])[0]

    def sdpa_full(c):
        b, k, g, _, d = c["query"].shape
        return F.scaled_dot_product_attention(c["query"].view(b, k * g, 1, d), c["full_k"], c["full_v"],
                                              scale=c["scaling"], enable_gqa=True)

    # Correctness on the device: float64 reference on a small case, fresh inputs.
    small_batch, small_context = (4, 3000) if device == "cuda" else (2, 100)
    small = low_bit(kernel_case(small_batch, small_context, args.k_rank, args.v_rank, seed=1, dtype=dtype,
                                device=device))
    with torch.no_grad():
        ref, _ = pre_rope_latent_attention(
            small["query"].double(), small["k_latent"].double(), small["v_latent"].double(),
            copy.deepcopy(small["k_up"]).double(), copy.deepcopy(small["v_up"]).double(),
            KeyRotary(small["key_rotary"].positions, small["key_rotary"].inv_freq, 1.0, torch.float64),
            small["mask"], small["scaling"])
        errors, refused = [], []
        for name, fn in kernels:
            try:
                errors.append(((fn(small).double() - ref[:, :, :, 0]).norm() / ref.norm()).item())
            except Exception as e:  # a swept tile too big for the GPU (Triton's OutOfResources): not a column
                refused.append(name)
                print(f"{name}: refused ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        column_errors = dict(zip([name for name, _ in kernels if name not in refused], errors))
        kernels = [(name, fn) for name, fn in kernels if name not in refused]
        error = max(errors)
    print(f"kernel vs float64 reference (B={small_batch}, S={small_context}, {dtype} queries, {args.cache_bits}-bit "
          f"latents, every kernel column): largest relative error {error:.2e} ("
          + ", ".join(f"{name} {e:.2e}" for name, e in column_errors.items()) + ")")

    batches = args.batch or [1, 8, 64, 256]
    contexts = args.context or [1024, 4096, 16384]
    rows = []
    for batch in batches:
        for context in contexts:
            full_bytes = 2 * batch * 3 * context * 64 * 2
            if full_bytes > 24e9:
                continue
            c = low_bit(kernel_case(batch, context, args.k_rank, args.v_rank, dtype=dtype, device=device))
            # Latents (bf16: 2 bytes per rank; 8 bits: 1 and a 2-byte scale per slot and tensor; 4 bits: half),
            # + an int64 position and a mask byte per slot.
            per_slot = {16: (args.k_rank + args.v_rank) * 2, 8: args.k_rank + args.v_rank + 4,
                        4: (args.k_rank + args.v_rank) // 2 + 4}[args.cache_bits]
            latent_bytes = batch * context * (per_slot + 8 + 1)
            row = dict(batch=batch, context=context, k_rank=args.k_rank, v_rank=args.v_rank,
                       cache_bits=args.cache_bits, full_cache_bytes=full_bytes, latent_bytes=latent_bytes)
            with torch.no_grad():
                for name, fn in [("sdpa_full", sdpa_full), ("torch_latent", torch_latent)] + kernels:
                    # Eager, and replayed as a CUDA graph: the GPU's time without Python's launch overhead.
                    ms, graph_ms = timings(fn, c)
                    row[f"{name}_us"] = ms * 1e3
                    row[f"{name}_graph_us"] = graph_ms * 1e3
            row["full_floor_us"] = full_bytes / copy_bandwidth * 1e6
            row["latent_floor_us"] = latent_bytes / copy_bandwidth * 1e6
            row["sdpa_graph_TBps"] = full_bytes / (row["sdpa_full_graph_us"] * 1e-6) / 1e12
            line = (f"B={batch:4d} S={context:6d} eager/graph us: sdpa_full {row['sdpa_full_us']:8.1f} "
                    f"{row['sdpa_full_graph_us']:8.1f} ({row['sdpa_graph_TBps']:.2f} TB/s)  torch_latent "
                    f"{row['torch_latent_us']:8.1f} {row['torch_latent_graph_us']:8.1f}")
            for name, _ in kernels:
                tbps = latent_bytes / (row[f"{name}_graph_us"] * 1e-6) / 1e12
                row[name.replace("triton_latent", "triton_graph_TBps")] = tbps  # triton_graph_TBps[_kv1_pps8...]
                line += f"  {name} {row[f'{name}_us']:8.1f} {row[f'{name}_graph_us']:8.1f} ({tbps:.2f} TB/s)"
            row["triton_best"] = min((name for name, _ in kernels), key=lambda name: row[f"{name}_graph_us"])
            rows.append(row)
            print(f"{line}; latent floor {row['latent_floor_us']:.1f} us; fastest {row['triton_best']}", flush=True)
            c.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, error


def partial_rope_case(batch, context, kv_rank, rope_dims, rope_heads, seed=0, kv_heads=3, group=3, dim=64,
                      dtype=torch.bfloat16, device="cuda", cache_bits=16):
    """partial_rope_attention's arguments for one decode token: k_rope [B, rope_heads, S, Dr], latent [B, S, R]; with
    cache_bits 8, both int8 with their scales (k_rope_scale, kv_latent_scale), as a cache_bits: 8 layer holds them."""
    from torch import nn

    from kvforge.models.modeling_kvforge import quantize_slots

    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    k_up = nn.Linear(kv_rank, kv_heads * (dim - rope_dims), bias=False, device=device, dtype=dtype)
    v_up = nn.Linear(kv_rank, kv_heads * dim, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        k_up.weight.copy_(rand(*k_up.weight.shape, scale=kv_rank ** -0.5))
        v_up.weight.copy_(rand(*v_up.weight.shape, scale=kv_rank ** -0.5))
        v_up.bias.copy_(rand(*v_up.bias.shape, scale=0.1))
    case = dict(query_rope=rand(batch, kv_heads, group, 1, rope_dims),
                query_nope=rand(batch, kv_heads, group, 1, dim - rope_dims),
                k_rope=rand(batch, rope_heads, context, rope_dims), kv_latent=rand(batch, context, kv_rank),
                k_up=k_up, v_up=v_up, mask=torch.ones(batch, 1, 1, 1, context, dtype=torch.bool, device=device),
                scaling=dim ** -0.5)
    if cache_bits == 8:
        case["k_rope"], case["k_rope_scale"] = quantize_slots(case["k_rope"], 2)
        case["kv_latent"], case["kv_latent_scale"] = quantize_slots(case["kv_latent"], 1)
    elif cache_bits != 16:
        raise ValueError(f"the partial part takes --cache-bits 16 or 8, not {cache_bits}")
    return case


PARTIAL_SCALES = ("k_rope_scale", "kv_latent_scale")


def partial_cache_bytes(batch: int, context: int, kv_rank: int, rope_dims: int, rope_heads: int,
                        cache_bits: int) -> int:
    """The bytes the partial-RoPE kernel must read: each slot's latent and rotary keys, an 8-bit cache's two
    bf16 scales, and its mask byte."""
    elements = kv_rank + rope_heads * rope_dims
    return batch * context * ((elements + 2 * 2 if cache_bits == 8 else 2 * elements) + 1)


# The KERNEL_SWEEP settings the partial-RoPE kernel takes.
PARTIAL_SWEEP = ("programs_per_sm", "whole_waves", "block_s", "num_warps", "num_stages", "prefetch_slots",
                 "slot_rows", "fused_values", "int8_scores", "split_columns", "max_registers", *PARTIAL_ONLY)
PARTIAL_ARGS = ("query_rope", "query_nope", "k_rope", "kv_latent", "k_up", "v_up", "mask", "scaling")


# Distinct bytes a kernel column's replayed calls read in turn, in L2 caches (--l2 cold).
COLD_L2_MULTIPLE = 8


def l2_cold_cases(case: dict, l2_bytes: int, multiple: int = COLD_L2_MULTIPLE) -> list[dict]:
    """`case` and copies of its tensors (modules and other values shared), as many as make calls over them in turn
    read `multiple` L2 caches (of `l2_bytes`) worth of distinct memory, as a model's step does, whose layers each
    read their own cache (a replayed call over one case could find in L2 what the last one read). Fewer copies where
    memory runs out."""
    size = sum(value.numel() * value.element_size() for value in case.values() if isinstance(value, torch.Tensor))
    wanted = max(1, math.ceil(multiple * l2_bytes / max(size, 1)))
    cases = [case]
    try:
        while len(cases) < wanted:
            cases.append({name: value.clone() if isinstance(value, torch.Tensor) else value
                          for name, value in case.items()})
    except torch.OutOfMemoryError:
        pass
    return cases


def cuda_timings(fn, case: dict, l2: str = "warm") -> tuple[float, float]:
    """(eager, CUDA-graph replay) median milliseconds of fn(case); NaN for a case that runs out of memory. Eager:
    triton's do_bench, which clears L2 before each call (and counts Python's launch overhead). Replayed: one call's
    share of a graph of calls over `case` again and again (l2 "warm"), or over l2_cold_cases(case) in turn ("cold").
    H200, session 26: the same within 1% (the GQA kernel, bf16 and 8-bit, and the 8-bit partial-RoPE kernel, 64 x 4k
    to 128 x 16k, the smallest case 51 MB against 50 MiB of L2)."""
    import triton.testing

    try:
        eager = triton.testing.do_bench(lambda: fn(case), warmup=25, rep=100, return_mode="median")
        cases = l2_cold_cases(case, torch.cuda.get_device_properties(0).L2_cache_size) if l2 == "cold" else [case]
        graph = triton.testing.do_bench_cudagraph(lambda: [fn(c) for c in cases], rep=100, return_mode="median")
        return eager, graph / len(cases)
    except torch.OutOfMemoryError:
        return float("nan"), float("nan")


def run_partial_rope_kernel_part(args, copy_bandwidth: float, device="cuda", timings=None,
                                 dtype=torch.bfloat16):
    """Rows of torch_partial vs triton_partial, Kr = K and Kr = 1, and the kernel's largest relative error
    against float64. `device`, `timings`, `dtype`: the CPU test of this code (Triton's interpreter, where bf16
    dots are unreliable, so float16)."""
    timings = timings or functools.partial(cuda_timings, l2=args.l2)
    from kvforge.kernels.partial_rope_decode import partial_rope_decode_attention
    from kvforge.models.modeling_kvforge import partial_rope_attention

    def scales(c):
        return {name: c[name] for name in PARTIAL_SCALES if name in c}

    def triton_partial(c, settings):
        return partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"],
                                             c["kv_latent"], c["k_up"].weight, c["v_up"].weight, c["v_up"].bias,
                                             c["scaling"], valid=c["mask"][:, 0, 0, 0], **settings, **scales(c))

    # One column per combination of the PARTIAL_SWEEP settings given, as the latent part names them:
    # triton_partial (the kernel's choices), triton_partial_sr0, triton_partial_bs32_w8_sr1, ...
    kernels = [(name.replace("triton_latent", "triton_partial"), functools.partial(triton_partial, settings=settings))
               for name, settings in kernel_columns(args, PARTIAL_SWEEP)]

    def torch_partial(c):
        return partial_rope_attention(*[c[k] for k in PARTIAL_ARGS], **scales(c))[0][:, :, :, 0]

    def dequantized(c, name):  # float64, as the cache's values and scales give them
        value = c[name].double()
        return value * c[name + "_scale"].double() if name + "_scale" in c else value

    kv_heads = 3
    error = 0.0
    small_batch, small_context = (4, 3000) if device == "cuda" else (2, 100)
    for rope_heads in (kv_heads, 1):
        small = partial_rope_case(small_batch, small_context, args.kv_rank, args.rope_dims, rope_heads, seed=1,
                                  dtype=dtype, device=device, cache_bits=args.cache_bits)
        with torch.no_grad():
            ref, _ = partial_rope_attention(
                small["query_rope"].double(), small["query_nope"].double(), dequantized(small, "k_rope"),
                dequantized(small, "kv_latent"), copy.deepcopy(small["k_up"]).double(),
                copy.deepcopy(small["v_up"]).double(), small["mask"], small["scaling"], absorb=True)
            for _, fn in kernels:
                error = max(error, ((fn(small).double() - ref[:, :, :, 0]).norm() / ref.norm()).item())
    print(f"partial-RoPE kernel vs float64 reference (B={small_batch}, S={small_context}, {dtype}, "
          f"{args.cache_bits}-bit cache, Kr = 3 and 1): relative error {error:.2e}")

    rows = []
    for batch in args.batch or [1, 8, 64, 256]:
        for context in args.context or [1024, 4096, 16384, 32768]:
            for rope_heads in (kv_heads, 1):
                c = partial_rope_case(batch, context, args.kv_rank, args.rope_dims, rope_heads, dtype=dtype,
                                      device=device, cache_bits=args.cache_bits)
                cache_bytes = partial_cache_bytes(batch, context, args.kv_rank, args.rope_dims, rope_heads,
                                                  args.cache_bits)
                row = dict(batch=batch, context=context, kv_rank=args.kv_rank, rope_dims=args.rope_dims,
                           rope_heads=rope_heads, cache_bits=args.cache_bits, cache_bytes=cache_bytes,
                           floor_us=cache_bytes / copy_bandwidth * 1e6)
                with torch.no_grad():
                    for name, fn in [("torch_partial", torch_partial)] + kernels:
                        ms, graph_ms = timings(fn, c)
                        row[f"{name}_us"], row[f"{name}_graph_us"] = ms * 1e3, graph_ms * 1e3
                        row[f"{name}_graph_GBps"] = cache_bytes / (graph_ms * 1e-3) / 1e9
                rows.append(row)
                print(f"B={batch:4d} S={context:6d} Kr={rope_heads} eager/graph us: " + "  ".join(
                    f"{name} {row[f'{name}_us']:8.1f} {row[f'{name}_graph_us']:8.1f} "
                    f"({row[f'{name}_graph_GBps']:.0f} GB/s)" for name in ["torch_partial"] + [n for n, _ in kernels])
                    + f"; floor {row['floor_us']:.1f} us", flush=True)
                c.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows, error


# The KERNEL_SWEEP settings the GQA kernel takes, and those only its low-bit cache's columns take.
GQA_SWEEP = ("programs_per_sm", "whole_waves", "block_s", "num_warps", "num_stages", "prefetch_slots", "max_registers")
GQA_LOW_BIT_SWEEP = ("half_products", "int8_scores")


def run_gqa_kernel_part(args, copy_bandwidth: float, device="cuda", timings=None, dtype=torch.bfloat16):
    """Rows of SDPA and kernels/gqa_decode.py over a dense GQA cache of SmolLM2's shape (3 KV heads of 64, 3 query
    heads each; a merged-heads or window layer is the same kernel), bf16 and low-bit (--cache-bits 8, the default
    here, or 4: keys and values as a cache_bits layer stores them, a scale per slot each), and the largest relative
    error against float64. `device`, `timings`, `dtype`: the CPU test of this code (Triton's interpreter, float16)."""
    timings = timings or functools.partial(cuda_timings, l2=args.l2)
    import torch.nn.functional as F

    from kvforge.kernels.gqa_decode import gqa_decode_attention
    from kvforge.models.modeling_kvforge import kv_attention, quantize_slots

    kv_heads, group, dim = 3, 3, 64
    low_bits = args.cache_bits if args.cache_bits in (8, 4) else 8
    low_label = f"int{low_bits}"

    def case(batch, context, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        keys, values = (torch.randn(batch, kv_heads, context, dim, generator=g, device=device).to(dtype)
                        for _ in range(2))
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(keys, 2, low_bits), quantize_slots(values, 2, low_bits)
        return dict(query=torch.randn(batch, kv_heads, group, dim, generator=g, device=device).to(dtype), keys=keys,
                    values=values, k_q=k_q, v_q=v_q, k_scale=k_scale, v_scale=v_scale,
                    valid=torch.ones(batch, context, dtype=torch.bool, device=device))

    def sdpa(c):
        b, k, g, d = c["query"].shape
        return F.scaled_dot_product_attention(c["query"].reshape(b, k * g, 1, d), c["keys"], c["values"],
                                              scale=dim ** -0.5, enable_gqa=True)

    def gqa(c, bits, settings):
        if bits == 16:
            return gqa_decode_attention(c["query"], c["keys"], c["values"], None, dim ** -0.5, valid=c["valid"],
                                        **settings)
        return gqa_decode_attention(c["query"], c["k_q"], c["v_q"], None, dim ** -0.5, valid=c["valid"],
                                    k_scale=c["k_scale"], v_scale=c["v_scale"], **settings)

    def torch_kv(c, bits, exact=False):
        """modeling_kvforge.kv_attention over the cache of `bits`: what KVFORGE_KERNELS=off runs for a dense /
        merged-heads / window layer's decode step (SDPA), or with `exact` its explicit softmax in float64 over the
        values the cache holds (the reference)."""
        cast = torch.Tensor.double if exact else (lambda t: t)
        query, mask = cast(c["query"])[:, :, :, None], c["valid"][:, None, None, None, :]
        cache = (dict(key=cast(c["keys"]), value=cast(c["values"])) if bits == 16 else
                 dict(key=c["k_q"], value=c["v_q"], k_scale=cast(c["k_scale"]), v_scale=cast(c["v_scale"])))
        out, _ = kv_attention(query, mask=mask, scaling=dim ** -0.5, use_sdpa=not exact, **cache)
        return out[:, :, :, 0]

    # kvforge's PyTorch path over each cache, then the kernel over the bf16 cache and the low-bit one, per
    # combination of the settings swept (half products: the low-bit cache's only), named as the other parts name
    # them (triton_gqa_bf16_bs128, triton_gqa_int8_bs128_hp1, ...).
    columns = [(f"torch_kv_{label}", bits, functools.partial(torch_kv, bits=bits))
               for bits, label in ((16, "bf16"), (low_bits, low_label))]
    columns += [(name.replace("triton_latent", f"triton_gqa_{label}"), bits,
                 functools.partial(gqa, bits=bits, settings=settings))
                for bits, label in ((16, "bf16"), (low_bits, low_label))
                for name, settings in kernel_columns(args, GQA_SWEEP + (GQA_LOW_BIT_SWEEP if bits < 16 else ()))]

    small_batch, small_context = (4, 3000) if device == "cuda" else (2, 100)
    small = case(small_batch, small_context, seed=1)
    error = 0.0
    with torch.no_grad():
        references = {bits: torch_kv(small, bits, exact=True) for bits in (16, low_bits)}
        for name, bits, fn in columns:
            ref = references[bits]
            error = max(error, ((fn(small).double() - ref).norm() / ref.norm()).item())
    print(f"GQA kernel vs float64 reference (B={small_batch}, S={small_context}, {dtype} queries, bf16 and "
          f"{low_bits}-bit caches): relative error {error:.2e}")

    rows = []
    for batch in args.batch or [64, 128]:
        for context in args.context or [4096, 16384]:
            c = case(batch, context)
            # keys and values (bf16: 2 bytes a number; 8 / 4 bits: 1 / 0.5, and a 2-byte scale per slot each) + a
            # mask byte
            cache_bytes = {16: batch * context * (2 * kv_heads * dim * 2 + 1),
                           low_bits: batch * context * (2 * kv_heads * dim * low_bits // 8 + 2 * 2 + 1)}
            row = dict(batch=batch, context=context, bf16_bytes=cache_bytes[16],
                       **{f"{low_label}_bytes": cache_bytes[low_bits]})
            with torch.no_grad():
                for name, bits, fn in [("sdpa_full", 16, sdpa)] + columns:
                    ms, graph_ms = timings(fn, c)
                    row[f"{name}_us"], row[f"{name}_graph_us"] = ms * 1e3, graph_ms * 1e3
                    row[f"{name}_of_copy"] = cache_bytes[bits] / copy_bandwidth / (graph_ms * 1e-3)
            rows.append(row)
            print(f"B={batch:4d} S={context:6d} eager/graph us: " + "  ".join(
                f"{name} {row[f'{name}_us']:8.1f} {row[f'{name}_graph_us']:8.1f} ({row[f'{name}_of_copy']:.0%} of copy)"
                for name in ["sdpa_full"] + [n for n, _, _ in columns]), flush=True)
            c.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, error


def copy_bandwidth_bytes_per_s() -> float:
    import triton.testing

    buffers = [torch.empty(1024 ** 3, dtype=torch.bfloat16, device="cuda").normal_()]  # 2 GiB
    buffers.append(torch.empty_like(buffers[0]))
    ms = triton.testing.do_bench(lambda: buffers[1].copy_(buffers[0]), warmup=10, rep=50, return_mode="median")
    bandwidth = 2 * buffers[0].numel() * buffers[0].element_size() / (ms * 1e-3)
    buffers.clear()
    torch.cuda.empty_cache()
    return bandwidth


# ---------------------------------------------------------------------------------------------------
# generate() part


def cache_arguments(model, ids, new_tokens: int, cache: str | None, kept: dict | None = None) -> dict:
    """generate()'s cache arguments for a GENERATE_VARIANTS row's cache mode (see timed_generate): a fresh one per
    call, or with `kept` (a dict the caller keeps per model) one per cache length, reset before each later call."""
    if cache in ("kvforge", "kvforge-compiled"):
        length = ids.shape[1] + new_tokens
        if kept is not None and length in kept:
            kept[length].reset()
            return {"cache": kept[length]}
        made = model.static_cache(length, compile_step=cache == "kvforge-compiled")
        if kept is not None:
            kept[length] = made
        return {"cache": made}
    return {"cache_implementation": "static"} if cache == "transformers" else {}


def timed_generate(model, ids, new_tokens: int, repeats: int, cache: str | None = None,
                   prefill_chunk: int = 0, kept: dict | None = None) -> tuple[float, object]:
    """Median seconds of generate(). cache="kvforge" passes a KVForgeCache(static=True): a fresh one per call, so
    every call pays its CUDA graph capture (in the first decode step), or with `kept` one per cache length kept
    across calls and reset() before each (as transformers keeps its StaticCache, and a server its cache): the
    first call captures, later ones replay, and every call must generate the same tokens ("kvforge-compiled":
    with compile_step=True, the step compiled once per model, in the warm-up call); cache="transformers" asks for
    transformers' StaticCache, whose decode step generate() compiles itself (torch.compile, once per shape: the
    warm-up call pays it) and which generate() keeps on the model and resets; None: the model's default (dynamic)
    cache. prefill_chunk: generate()'s prefill_chunk_size (0: the prompt in one forward)."""
    times, out, first = [], None, None
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)  # a CPU run: profiled_generate's test
    for _ in range(repeats):
        kwargs = cache_arguments(model, ids, new_tokens, cache, kept)
        if prefill_chunk:
            kwargs["prefill_chunk_size"] = prefill_chunk
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
        if first is None:
            first = out.sequences
        elif kept is not None and cache in ("kvforge", "kvforge-compiled") and not torch.equal(out.sequences, first):
            # greedy on the same prompts: a reused cache read stale state (transformers' own cache is not checked:
            # its repeats decoded other tokens on random weights, whose near-tied logits its kernels break apart)
            raise RuntimeError(f"generate() with a kept and reset {cache} cache gave other tokens than its first "
                               "call on the same prompts")
    return statistics.median(times), out


def lr50_spec(num_layers: int) -> dict:
    """The low-rank 50% spec of docs/results/exports-cpu (surgery's greedy ranks on SmolLM2)."""
    return json.loads(LR50_SPEC.read_text())["spec"]


def lr25_int8_spec(num_layers: int) -> dict:
    """The low-rank 25% spec with 8-bit latents of docs/results/int8-cache-cpu (greedy ranks in bytes on SmolLM2):
    the cache form of configs/recovery/lowrank-25-int8-long.yaml."""
    return json.loads(LR25_INT8_SPEC.read_text())["spec"]


def lr25_bf16_spec(num_layers: int) -> dict:
    """lr25-int8's ranks with the latents cached in the model's dtype (twice the bytes): what the int8 path costs."""
    spec = lr25_int8_spec(num_layers)
    return {**spec, "layers": [{k: v for k, v in layer.items() if k != "cache_bits"} for layer in spec["layers"]]}


def ranks_rounded(spec: dict, multiple: int) -> dict:
    """`spec` with every latent rank rounded to the nearest multiple of `multiple` (at least one): about the same
    bytes, with cache rows on 16-byte boundaries when `multiple` is 16 bytes' worth of cached values."""
    return {**spec, "layers": [{**layer, **{k: max(multiple, round(layer[k] / multiple) * multiple)
                                            for k in ("k_rank", "v_rank") if layer.get(k)}}
                               for layer in spec["layers"]]}


def lr25_int8_aligned_spec(num_layers: int) -> dict:
    """lr25-int8 with every rank rounded to a multiple of 16 (int8 rows on 16-byte boundaries): what odd ranks cost
    (session 12: 1.85x faster at B=32, S=16k)."""
    return ranks_rounded(lr25_int8_spec(num_layers), 16)


def lr12_int4_spec(num_layers: int) -> dict:
    """The low-rank 12.5% spec with 4-bit latents of docs/results/int8-cache-cpu (greedy even ranks, channels
    balanced): the cache form of configs/recovery/lowrank-12-int4-long.yaml (+9.5% on the GPU, session 12)."""
    return json.loads(LR12_INT4_SPEC.read_text())["spec"]


def lr12_int4_aligned_spec(num_layers: int) -> dict:
    """lr12-int4 with ranks rounded to multiples of 32: packed rows of rank / 2 bytes on 16-byte boundaries."""
    return ranks_rounded(lr12_int4_spec(num_layers), 32)


def standard_spec(num_layers: int, cache_bits: int | None = None):
    """The original layout as a kvforge model (dense GQA layers), its K and V in `cache_bits` if given."""
    from transformers import LlamaConfig

    from kvforge.models.presets import build_preset

    arguments = {} if cache_bits is None else {"cache_bits": cache_bits}  # build_preset applies it to every layer
    return build_preset("standard", LlamaConfig(**{**SMOLLM2, "num_hidden_layers": num_layers}), **arguments)


def mixattention_spec(num_layers: int):
    """configs/recovery/mixattention-ma.yaml's layout: MixAttention MA, window 252 with 4 sinks, KV shared."""
    from kvforge.models.presets import PRESETS

    return PRESETS["mixattention-ma"](num_layers, window=252, sinks=4)


def window_spec(num_layers: int):
    """Every layer a window of 1,024 (ring caches): its decode time should not grow with the context."""
    from kvforge.models.presets import PRESETS

    return PRESETS["sliding-window"](num_layers, window=1024)


def recipe_spec(recipe: str, num_layers: int) -> dict:
    """The compression of configs/recovery/<recipe>.yaml as the model has it before surgery: its preset at its
    arguments (uniform ranks; surgery's greedy ones need the real model's statistics), or its explicit layers."""
    from transformers import LlamaConfig

    from kvforge.models.presets import build_preset
    from kvforge.trainer.config import load_config

    # Only the compression is read: the recipe's data mix (corpora packed on the training machine) is dropped, so
    # that its paths need not exist where the benchmark runs.
    compression = load_config(REPO / "configs" / "recovery" / f"{recipe}.yaml", ["data.mix=[]"]).compression
    if compression.layers:
        if len(compression.layers) != num_layers:
            raise ValueError(f"recipe {recipe} has {len(compression.layers)} layers, the model {num_layers}")
        return {"layers": [layer.to_dict() for layer in compression.layers]}
    base = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": num_layers})
    return build_preset(compression.preset, base, **dict(compression.arguments))


def aligned_recipe_spec(recipe: str, num_layers: int, multiple: int = 16):
    """recipe_spec with each latent rank rounded to the nearest multiple of `multiple` (at least one), as surgery's
    rank_multiple: auto leaves a low-bit recipe's trained ranks (16-byte rows), where the preset's uniform rank of
    the budget need not be one (partial-rope-25-int8-long: 92 -> 96)."""
    spec = recipe_spec(recipe, num_layers)
    for layer in spec.layers:
        for name in ("k_rank", "v_rank", "kv_rank"):
            if getattr(layer, name) is not None:
                setattr(layer, name, max(multiple, round(getattr(layer, name) / multiple) * multiple))
    return spec


# name -> (what the row is, the compression spec of num_layers (None: the original), KVFORGE_KERNELS, cache)
GENERATE_VARIANTS = {
    "original": ("original (transformers Llama, SDPA)", None, None, None),
    "original-static": ("original, transformers StaticCache + compile", None, None, "transformers"),
    "lr50-torch": ("lr50, KVFORGE_KERNELS=off", lr50_spec, "off", None),
    "lr50-triton": ("lr50, KVFORGE_KERNELS=auto (Triton)", lr50_spec, "auto", None),
    "lr50-static": ("lr50, Triton, static cache + CUDA graph", lr50_spec, "auto", "kvforge"),
    "lr25-int8-static": ("lr25 in 8 bits, Triton reading int8, static cache + CUDA graph", lr25_int8_spec, "auto",
                         "kvforge"),
    # Where the 8-bit 25% model's decode time goes (session 11: 0.98x the original at B=32, S=16k): the PyTorch
    # reference on the same cache, the same ranks in bf16, and ranks on 16-byte boundaries.
    "lr25-int8-torch-static": ("lr25 in 8 bits, PyTorch (KVFORGE_KERNELS=off), static cache + CUDA graph",
                               lr25_int8_spec, "off", "kvforge"),
    "lr25-bf16-static": ("lr25's ranks in bf16, Triton, static cache + CUDA graph", lr25_bf16_spec, "auto", "kvforge"),
    "lr25-int8-aligned-static": ("lr25 in 8 bits, ranks multiples of 16, Triton, static cache + CUDA graph",
                                 lr25_int8_aligned_spec, "auto", "kvforge"),
    "mixattention-static": ("mixattention-ma (W=252, 4 sinks), static cache + CUDA graph", mixattention_spec, "auto",
                            "kvforge"),
    "window-static": ("every layer window 1,024, static cache + CUDA graph", window_spec, "auto", "kvforge"),
    # The 12.5% recipe's cache (4-bit latents), with its greedy ranks and with rows on 16-byte boundaries.
    "lr12-int4-static": ("lr12 in 4 bits, Triton reading packed bytes, static cache + CUDA graph", lr12_int4_spec,
                         "auto", "kvforge"),
    "lr12-int4-aligned-static": ("lr12 in 4 bits, ranks multiples of 32, Triton, static cache + CUDA graph",
                                 lr12_int4_aligned_spec, "auto", "kvforge"),
    # The GQA kernel (kernels/gqa_decode.py) serves dense, merged-heads and window layers under auto since session 25
    # (13.2 ms a step for the original layout with kvforge's PyTorch path at B=128 x 4k, 5.6 with the kernel); the
    # -torch rows are that PyTorch path (KVFORGE_KERNELS=off). Every row below runs auto's choice.
    "standard-static": ("original layout in kvforge, static cache + CUDA graph", standard_spec, "auto", "kvforge"),
    "standard-torch-static": ("original layout in kvforge, PyTorch (KVFORGE_KERNELS=off), static cache + CUDA graph",
                              standard_spec, "off", "kvforge"),
    "window-torch-static": ("every layer window 1,024, PyTorch (KVFORGE_KERNELS=off), static cache + CUDA graph",
                            window_spec, "off", "kvforge"),
    "standard-int8-static": ("original layout, K and V in int8 (50%), static cache + CUDA graph",
                             functools.partial(standard_spec, cache_bits=8), "auto", "kvforge"),
    # The other layouts of issue 10's recipes, at their presets' uniform ranks.
    "partial-rope-25-static": ("partial-rope-25 (per-head partial RoPE, 25%), static cache + CUDA graph",
                               functools.partial(recipe_spec, "partial-rope-25"), "auto", "kvforge"),
    "partial-rope-25-int8-static": ("partial-rope-25-int8-long (8-bit partial RoPE, 32 rotary dims per head, latent "
                                    "96), static cache + CUDA graph",
                                    functools.partial(aligned_recipe_spec, "partial-rope-25-int8-long"), "auto",
                                    "kvforge"),
    "partial-rope-50-static": ("partial-rope-50 (per-head partial RoPE, 50%), static cache + CUDA graph",
                               functools.partial(recipe_spec, "partial-rope-50"), "auto", "kvforge"),
    "merged-heads-static": ("merged-heads-33 (3 -> 1 KV heads), static cache + CUDA graph",
                            functools.partial(recipe_spec, "merged-heads-33"), "auto", "kvforge"),
    "window-lowrank-12-static": ("window-lowrank-12 (windows of 1,020 + 4 sinks beside latents), static cache + "
                                 "CUDA graph", functools.partial(recipe_spec, "window-lowrank-12"), "auto", "kvforge"),
}


def cache_bytes(cache) -> int:
    if hasattr(cache, "cache_bytes"):
        return cache.cache_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def variant_model(base, spec_of, mode: str | None):
    """A GENERATE_VARIANTS row's model on the GPU in bf16 with random weights (seed 0): the transformers Llama of
    `base` (spec_of None), else the kvforge model of spec_of's compression with KVFORGE_KERNELS=mode."""
    from transformers import LlamaForCausalLM

    from kvforge.models.configuration_kvforge import KVForgeConfig
    from kvforge.models.modeling_kvforge import KVForgeForCausalLM

    torch.manual_seed(0)
    if spec_of is None:
        model = LlamaForCausalLM(base)
    else:
        os.environ["KVFORGE_KERNELS"] = mode
        config = KVForgeConfig.from_base_config(base, spec_of(base.num_hidden_layers))
        config._attn_implementation = "sdpa"
        model = KVForgeForCausalLM(config)
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def exported_copy(model, out_dir: Path):
    """`model` (a KVForgeForCausalLM) written by kvforge's exporter (verified, code bundled) and loaded back the
    way a user loads it: plain transformers with trust_remote_code, on the model's device and dtype."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from kvforge.models.export import export_model

    dtype = str(model.dtype).removeprefix("torch.")
    export_model(model, None, out_dir, dtype=dtype, overwrite=True)
    auto_map = json.loads((Path(out_dir) / "config.json").read_text())["auto_map"]
    # The directory's own classes, as AutoModelForCausalLM(trust_remote_code=True) resolves them in a process
    # without kvforge; here kvforge's import has registered its classes for the same config type, which the Auto
    # classes would pick instead.
    config_class, model_class = (get_class_from_dynamic_module(auto_map[key], str(out_dir))
                                 for key in ("AutoConfig", "AutoModelForCausalLM"))
    loaded = model_class.from_pretrained(out_dir, config=config_class.from_pretrained(out_dir), dtype=model.dtype)
    return loaded.to(model.device).eval()


def launch_settings(pairs: list[str], option: str = "--latent-kernel", defaults: dict | None = None) -> dict:
    """--latent-kernel KEY=N ... -> entries of `defaults` (the latent kernel's LAUNCH_DEFAULTS unless given; the
    partial-RoPE kernel's for --partial-kernel), each key checked."""
    from kvforge.kernels.latent_attention import LAUNCH_DEFAULTS

    defaults = LAUNCH_DEFAULTS if defaults is None else defaults
    settings = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults or not value.isdigit():
            raise SystemExit(f"{option} {pair!r}: expected KEY=N with KEY one of {sorted(defaults)}")
        settings[key] = int(value)
    return settings


def run_generate_part(args, save_rows=None) -> list[dict]:
    """generate() rows per --gen-batch and --gen-variants; save_rows(rows) after each (a run cut short by its time
    limit keeps the rows it finished)."""
    from transformers import LlamaConfig

    from kvforge.kernels import latent_attention, partial_rope_decode
    from kvforge.models.modeling_kvforge import generated_cache

    latent_attention.LAUNCH_DEFAULTS.update(launch_settings(args.latent_kernel))
    partial_rope_decode.LAUNCH_DEFAULTS.update(launch_settings(args.partial_kernel, "--partial-kernel",
                                                                      partial_rope_decode.LAUNCH_DEFAULTS))
    base = LlamaConfig(**SMOLLM2)
    base._attn_implementation = "sdpa"
    rows = []
    for batch in args.gen_batch:
        ids = torch.randint(3, base.vocab_size, (batch, args.gen_prompt), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        for variant in args.gen_variants:
            name, spec_of, mode, cache = GENERATE_VARIANTS[variant]
            if args.compile_step and cache == "kvforge":
                name, cache = name + ", compiled step", "kvforge-compiled"
            model = variant_model(base, spec_of, mode)
            via_export = args.via_export is not None and spec_of is not None
            if via_export:
                model = exported_copy(model, args.via_export / variant)
            with torch.no_grad():
                kept = None if args.fresh_cache else {}
                timed_generate(model, ids, 3, 1, cache, args.prefill_chunk)  # warm-up at full size: kernels compiled
                torch.cuda.reset_peak_memory_stats()
                prefill, _ = timed_generate(model, ids, 1, args.repeats, cache, args.prefill_chunk, kept)
                total, out = timed_generate(model, ids, args.gen_new + 1, args.repeats, cache, args.prefill_chunk,
                                            kept)
            decode = total - prefill
            row = dict(model=name, batch=batch, prompt=args.gen_prompt, new_tokens=args.gen_new,
                       # compiled, and kept after its first-call check (a fallback to the uncompiled step says so)
                       compile_step=callable(getattr(getattr(model, "model", None), "_compiled_decode_step", None)),
                       latent_kernel=dict(latent_attention.LAUNCH_DEFAULTS),
                       partial_kernel=dict(partial_rope_decode.LAUNCH_DEFAULTS), via_export=via_export,
                       cache_kept=kept is not None,
                       prefill_s=prefill, decode_s=decode, decode_tokens_per_s=batch * args.gen_new / decode,
                       ms_per_step=decode / args.gen_new * 1e3, cache_bytes=cache_bytes(generated_cache(out)),
                       peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
            rows.append(row)
            if save_rows is not None:
                save_rows(rows)
            if cache == "kvforge-compiled" and not row["compile_step"]:
                print(f"B={batch:4d} {name}: the compiled step fell back to the uncompiled one (see the warning)")
            print(f"B={batch:4d} {name:40s} decode {row['decode_tokens_per_s']:9.0f} tok/s "
                  f"({row['ms_per_step']:.2f} ms/step)  prefill {prefill:.2f} s  "
                  f"cache {row['cache_bytes'] / 2 ** 30:.2f} GiB  peak {row['peak_memory_gib']:.1f} GiB", flush=True)
            if args.profile:
                row["profile"] = profiled_generate(model, ids, args.profile, cache)
                print(row["profile"], flush=True)
            del model, out
            torch.cuda.empty_cache()
    os.environ.pop("KVFORGE_KERNELS", None)
    return rows


def profiled_generate(model, ids, new_tokens: int, cache: str | None, rows: int = 25) -> str:
    """torch.profiler over the decode steps of one generate() of `new_tokens` (the prefill is left out: the
    profiler starts when the first token's logits reach the logits processors), as a header and a table of ops by
    self device time (CPU time on a CPU). The header splits the step's wall time into device work and the rest:
    wall ms per step, the device's kernel time per step (summed self times: graph-replayed kernels are traced like
    launched ones), and the ratio, so a step whose time is not the kernels' shows as such."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LogitsProcessor, LogitsProcessorList

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    prof = profile(activities=activities)
    started = []

    class StartAfterPrefill(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not started:
                sync()
                prof.start()
                started.append(time.perf_counter())
            return scores

    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([StartAfterPrefill()]),
                       **cache_arguments(model, ids, new_tokens, cache))
        sync()
    wall = time.perf_counter() - started[0]
    prof.stop()
    steps = new_tokens - 1  # the profiled part: every decode step (and the last token's logits processing)
    events = prof.key_averages()
    device_us = sum(event.self_device_time_total for event in events) if ids.is_cuda else 0.0
    sort = "self_device_time_total" if ids.is_cuda else "self_cpu_time_total"
    header = (f"decode steps profiled: {steps}; wall {wall / steps * 1e3:.3f} ms/step (profiler on); device kernels "
              f"{device_us / steps / 1e3:.3f} ms/step ({device_us / 1e6 / wall:.0%} of the wall time)\n")
    return header + events.table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def largest_batch(fits, start: int = 8, limit: int = 4096) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch b <= limit with fits(b) (fits is monotone: a batch that fits, every smaller one fits),
    to within 1/32 below it: doubling from `start`, then bisection. Returns (batch, [(tried, fitted), ...]);
    0 if not even 1 fits."""
    tried = []

    def attempt(batch):
        tried.append((batch, fits(batch)))
        return tried[-1][1]

    low, high, batch = 0, None, start
    while high is None:
        if not attempt(batch):
            high = batch
        elif batch >= limit:
            return limit, tried
        else:
            low, batch = batch, min(2 * batch, limit)
    if low == 0:  # not even `start` fits
        if high == 1 or not attempt(1):
            return 0, tried
        low = 1
    while high - low > max(1, low // 32):
        middle = (low + high) // 2
        if attempt(middle):
            low = middle
        else:
            high = middle
    return low, tried


def run_max_batch_part(args) -> list[dict]:
    """Issue 12's "largest batch that fits at 32k context": per row, the largest batch whose generate() of
    --gen-prompt tokens and 4 new ones runs without running out of GPU memory (prefill included, as a user's call
    has it), and the cache bytes at that batch."""
    import gc

    from transformers import LlamaConfig

    base = LlamaConfig(**SMOLLM2)
    base._attn_implementation = "sdpa"
    def fits(model, cache, name, batch):
        ids = torch.randint(3, base.vocab_size, (batch, args.gen_prompt), device="cuda")
        try:
            with torch.no_grad():
                timed_generate(model, ids, 4, 1, cache, args.prefill_chunk)
            fitted = True
        except torch.cuda.OutOfMemoryError:
            fitted = False
        finally:
            del ids
            gc.collect()
            torch.cuda.empty_cache()
        # each attempt as it ends: a search cut short (a session's device time) still leaves its bounds in the log
        print(f"  {name}: batch {batch} {'fits' if fitted else 'out of memory'}", flush=True)
        return fitted

    rows = []
    for name, spec_of, mode, cache in (GENERATE_VARIANTS[v] for v in args.gen_variants):
        if cache == "transformers":
            continue  # a compiled static step recompiles per batch: the dynamic-cache row stands for the original
        model = variant_model(base, spec_of, mode)
        batch, tried = largest_batch(functools.partial(fits, model, cache, name), start=args.batch_start)
        per_sequence = (model.config.kv_cache_bytes(args.gen_prompt + 3, dtype=torch.bfloat16)
                        if spec_of is not None else 2 * base.num_hidden_layers * base.num_key_value_heads
                        * base.head_dim * 2 * (args.gen_prompt + 3))
        rows.append(dict(model=name, prompt=args.gen_prompt, prefill_chunk=args.prefill_chunk, largest_batch=batch,
                         tried=tried, cache_bytes_per_sequence=per_sequence,
                         cache_gib_at_largest=batch * per_sequence / 2 ** 30))
        print(f"{name:60s} largest batch {batch:5d} at {args.gen_prompt} tokens"
              f"{f' (prefill in chunks of {args.prefill_chunk})' if args.prefill_chunk else ''} "
              f"(cache {rows[-1]['cache_gib_at_largest']:.1f} GiB; tried {tried})", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    os.environ.pop("KVFORGE_KERNELS", None)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_bytes_per_s()
    print(f"{device}; torch {torch.__version__}; device copy {bandwidth / 1e12:.2f} TB/s (read + write)")
    result = dict(device=device, torch=torch.__version__, python=platform.python_version(),
                  copy_TBps=bandwidth / 1e12, command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))

    def save(what: dict) -> None:  # whole or not at all: a time limit may stop the run while it writes
        if args.json:
            partial = args.json.with_name(args.json.name + ".partial")
            partial.write_text(json.dumps(what, indent=1))
            os.replace(partial, args.json)
    if args.part in ("kernel", "latent", "both"):
        result["kernel"], result["kernel_relative_error"] = run_kernel_part(args, bandwidth)
    if args.part in ("kernel", "partial", "both"):
        result["kernel_partial_rope"], result["kernel_partial_rope_relative_error"] = run_partial_rope_kernel_part(
            args, bandwidth)
    if args.part == "gqa":
        result["kernel_gqa"], result["kernel_gqa_relative_error"] = run_gqa_kernel_part(args, bandwidth)
    if args.part in ("generate", "both"):
        result["generate"] = run_generate_part(args, lambda rows: save(dict(result, generate=rows)))
    if args.part == "max-batch":
        result["max_batch"] = run_max_batch_part(args)
    save(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
