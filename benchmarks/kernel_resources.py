"""Registers, spills and shared memory of the pre-RoPE latent decode kernel for an H100/H200 (sm_90), compiled on
a machine without a GPU: Triton lowers the kernel to PTX and its bundled ptxas assembles the cubin, whose resource
usage cuobjdump reads. A proxy that needs no device time: a kernel at 227 registers per thread runs two 4-warp
programs per SM, one that spills reads its own stack from memory. Timings still come from the GPU
(launch/benchmark_decode.py --part kernel); this says which configurations are worth timing.

    python benchmarks/kernel_resources.py            # the SmolLM2 layer: 9 query heads, 3 KV heads, head_dim 64

The Triton here is the one this machine has (requirements.lock); the GPU image's may allocate a few registers
differently, and may lower a kernel quite differently: to compile with the image's version (3.6.0 in session 22),
`pip install --no-deps --target /tmp/t36 triton==3.6.0` and run with PYTHONPATH=/tmp/t36 (the 8-bit partial-RoPE
kernel: 1,795 loop instructions per tile under 3.9.0, 1,673 under 3.6.0).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the GPU runs with; silences a warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvforge.kernels import latent_attention  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_latent_kernel(*, cache: str, k_rank: int, v_rank: int, kv_per_program: int, block_s: int,
                          num_warps: int, num_stages: int, prefetch: bool = False, split: bool = False,
                          slot_rows: bool = False, word_loads: bool = False, merged_halves: bool = False,
                          half_rope_table: bool = False, max_registers: int | None = None,
                          prefetch_slots: bool = False,
                          kv_heads: int = 3, group: int = 3, dim: int = 64, batch: int = 32, slots: int = 16384,
                          splits: int = 32, capability: int = 90):
    """The kernel as latent_decode_attention would launch it for bf16 queries and a `cache` of bf16, int8 or int4
    latents at batch x slots in `splits` splits, compiled for `capability`; returns Triton's compiled kernel (its
    .asm["cubin"], .asm["ptx"], .metadata). The integer arguments are specialised as Triton's launcher does at run
    time: multiples of 16 known to be so, ones made constants (without that, the compiler cannot prove a 16-byte
    row aligned and reads int8 tiles a byte at a time: 2,013 instructions per tile where 1,493 run)."""
    fn = latent_attention._latent_decode_kernel
    packed = cache == "int4"
    k_cols, v_cols = (k_rank // 2, v_rank // 2) if packed else (k_rank, v_rank)
    block_rk = latent_attention._next_power_of_2(k_cols)
    chunk_rk = block_rk if packed or block_rk <= 128 else 64
    # split: the key columns and value ranks each in two power-of-two tiles where one would be padded
    block_c, block_c2 = latent_attention.tile_widths(kv_per_program * dim // 2, split and chunk_rk == block_rk,
                                                     multiple=dim // 2)
    block_rv, block_rv2 = latent_attention.tile_widths(v_cols, split)
    constants = dict(
        HALF=dim // 2, BLOCK_H=latent_attention._next_power_of_2(kv_per_program * group), BLOCK_C=block_c,
        BLOCK_C2=block_c2, BLOCK_S=block_s, BLOCK_RK=block_rk, BLOCK_RV=block_rv, BLOCK_RV2=block_rv2,
        ACC_WIDTH=latent_attention._next_power_of_2(v_cols) * (2 if packed else 1), SLOT_ROWS=slot_rows,
        HAS_K_BIAS=False, HAS_SCALES=cache != "bf16", CHUNK_RK=chunk_rk, PACKED=packed, KV_PER_PROGRAM=kv_per_program,
        STAT_H=latent_attention._next_power_of_2(kv_heads * group), PREFETCH=prefetch,
        WORD_LOADS=word_loads and cache in ("int8", "int4") and not prefetch,
        MERGED_HALVES=merged_halves and slot_rows and not packed, PREFETCH_SLOTS=prefetch_slots)
    latent = {"bf16": "*bf16", "int8": "*i8", "int4": "*u8"}[cache]
    pointers = dict(Q="*bf16", K_LATENT=latent, V_LATENT=latent, K_WEIGHT="*bf16", K_BIAS="*bf16", POSITIONS="*i64",
                    VALID="*u8", ROPE="*fp16" if half_rope_table else "*fp32", K_SCALE="*bf16", V_SCALE="*bf16",
                    ACC="*fp32", MAX="*fp32", SUM="*fp32")
    heads, per_split = kv_heads * group, -(-slots // splits)
    ints = dict(stride_qb=heads * dim, stride_kb=slots * k_cols, stride_ks=k_cols, stride_vb=slots * v_cols,
                stride_vs=v_cols, stride_pb=slots, stride_mb=slots, stride_ksb=slots, stride_kss=1, stride_vsb=slots,
                stride_vss=1, slots=slots, heads=heads, group=group, kv_heads=kv_heads, k_rank=k_rank, v_rank=v_rank,
                slots_per_split=per_split, splits=splits)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if ints.get(name) == 1:  # Triton's launcher makes an integer argument of 1 a constant
            signature[name], constants[name] = "constexpr", 1
            continue
        signature[name] = pointers.get(name, "fp32" if name == "scaling" else "i32")
        # ... and marks pointers (allocations are 16-byte aligned) and integers that are multiples of 16
        if name in pointers or ints.get(name, 1) % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers))


def cuobjdump(kernel, flag: str) -> str:
    """What cuobjdump `flag` (-res-usage, -sass) prints for the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(CUOBJDUMP), flag, cubin.name], capture_output=True, text=True, check=True).stdout


def resources(kernel) -> dict:
    usage = cuobjdump(kernel, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    # Hopper's warpgroup MMAs (64+ rows per product) against the warp-level ones (16 rows) in the PTX
    ptx = kernel.asm["ptx"]
    return dict(registers=int(found[1]), stack_bytes=int(found[2]), shared_bytes=kernel.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                instructions=loop_instructions(cuobjdump(kernel, "-sass")))


def loop_instructions(sass: str) -> int:
    """SASS instructions in the longest loop body (the per-tile loop): from a backward branch's target to the
    branch, both included."""
    instructions = [(int(found[1], 16), line) for line in sass.splitlines()
                    if (found := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line))]
    index_of = {offset: index for index, (offset, _) in enumerate(instructions)}
    longest = 0
    for index, (_, line) in enumerate(instructions):
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", line)
        target = index_of.get(int(branch[1], 16)) if branch else None
        if target is not None and target < index:
            longest = max(longest, index - target + 1)
    return longest


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident programs per Hopper SM: 64K registers (allocated per warp in units of 256), 227 KiB of shared
    memory, 64 warps."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), (227 * 1024) // max(shared, 1), 64 // num_warps)


def compile_marked(fn, constants: dict, pointers: dict, multiple_of_16, num_warps: int, num_stages: int,
                   max_registers: int | None = None, capability: int = 90):
    """`fn` compiled for `capability` with `constants` as its constexprs, `pointers` (name -> Triton type) as its
    pointer arguments, `scaling` fp32 and every other argument i32; pointers and the integers `multiple_of_16(name)`
    names marked multiples of 16, as Triton's launcher marks them at run time. The decode kernels' scripts
    (gqa_kernel_resources.py, partial_kernel_resources.py) build their launches on it."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "fp32" if name == "scaling" else "i32")
        if name in pointers or multiple_of_16(name):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers))


def print_rows(rows, compile_kernel, first_column: str, num_warps: int = 4) -> None:
    """One table row per (label, settings) of `rows`: compile_kernel(**settings)'s registers, spills, shared memory,
    programs an SM (at `num_warps`), MMAs and loop instructions."""
    print(f"| {first_column} | registers | stack (spills) | shared KiB | programs/SM | MMAs: warpgroup / warp | "
          "loop instructions |")
    print("|---" * 7 + "|")
    for label, settings in rows:
        r = resources(compile_kernel(**settings))
        print(f"| {label} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
              f"{programs_per_sm(r['registers'], r['shared_bytes'], num_warps)} | {r['wgmma']} / {r['mma_sync']} | "
              f"{r['instructions']} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", nargs="*", default=["bf16", "int8", "int4"])
    parser.add_argument("--kv-per-program", type=int, nargs="*", default=[3, 1])
    parser.add_argument("--block-s", type=int, nargs="*", default=[32, 64, 128])
    parser.add_argument("--num-warps", type=int, nargs="*", default=[4])
    parser.add_argument("--num-stages", type=int, default=3)
    parser.add_argument("--prefetch", type=int, nargs="*", default=[0], choices=(0, 1))
    parser.add_argument("--split", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: key columns and value ranks in two tiles where one would be padded")
    parser.add_argument("--slot-rows", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: the slots as the rows of the score and value products")
    parser.add_argument("--word-loads", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: 8-bit latents read as 32-bit words and made float16 in registers")
    parser.add_argument("--merged-halves", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: a column group's halves in one key product and one score product (slot rows)")
    parser.add_argument("--half-rope-table", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: the cos/sin table in float16")
    parser.add_argument("--prefetch-slots", type=int, nargs="*", default=[0], choices=(0, 1),
                        help="1: each tile's positions, mask and scales loaded a tile ahead")
    parser.add_argument("--max-registers", type=int, nargs="*", default=[0],
                        help="a cap on registers per thread (0: ptxas's choice)")
    parser.add_argument("--ranks", type=int, nargs=2, default=None, metavar=("K", "V"),
                        help="key and value ranks for every cache (default: per cache, below)")
    args = parser.parse_args(argv)
    # The kernel rows' ranks (48 / 96) for bf16 and int8, a 4-bit one of 96 / 224; the aligned 25% int8 model's
    # commonest layer is 48 / 144, the aligned 12.5% 4-bit one's 64 / 128 (--ranks).
    ranks = {"bf16": (48, 96), "int8": (48, 96), "int4": (96, 224)}
    if args.ranks:
        ranks = dict.fromkeys(ranks, tuple(args.ranks))
    print(f"triton {triton.__version__}, sm_90, bf16 queries; k / v ranks per cache: {ranks}")
    print("| cache | KV heads per program | block_s | warps | prefetch | split | slot rows | word loads | merged "
          "halves | half rope table | slots a tile ahead | register cap | registers | stack (spills) | shared KiB | "
          "programs/SM | MMAs: warpgroup / warp | loop instructions |")
    print("|---" * 18 + "|")
    for cache, per_program, block_s, warps, prefetch, split, slot_rows, words, merged, half, ahead, cap in (
            itertools.product(args.caches, args.kv_per_program, args.block_s, args.num_warps, args.prefetch,
                              args.split, args.slot_rows, args.word_loads, args.merged_halves, args.half_rope_table,
                              args.prefetch_slots, args.max_registers)):
        kernel = compile_latent_kernel(cache=cache, k_rank=ranks[cache][0], v_rank=ranks[cache][1],
                                       kv_per_program=per_program, block_s=block_s, num_warps=warps,
                                       num_stages=args.num_stages, prefetch=bool(prefetch), split=bool(split),
                                       slot_rows=bool(slot_rows), word_loads=bool(words), merged_halves=bool(merged),
                                       half_rope_table=bool(half), max_registers=cap or None,
                                       prefetch_slots=bool(ahead))
        r = resources(kernel)
        print(f"| {cache} | {per_program} | {block_s} | {warps} | {prefetch} | {split} | {slot_rows} | {words} | "
              f"{merged} | {half} | {ahead} | {cap or ''} | {r['registers']} | {r['stack_bytes']} | "
              f"{r['shared_bytes'] / 1024:.0f} | "
              f"{programs_per_sm(r['registers'], r['shared_bytes'], warps)} | {r['wgmma']} / {r['mma_sync']} | "
              f"{r['instructions']} |", flush=True)


if __name__ == "__main__":
    main()
