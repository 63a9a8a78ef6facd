"""Fused decode attention over a pre-RoPE low-rank cache (Eigen Attention / Palu style), in Triton.

The cache holds two latents per token, c_k [B, S, Rk] and c_v [B, S, Rv]; a layer's keys are
k = RoPE(U_k c_k + b_k) and its values v = U_v c_v + b_v. RoPE sits between U_k and the query, so U_k cannot
be folded into the query (as MLA does): keys must be rebuilt. The PyTorch reference
(`pre_rope_latent_attention` in modeling_kvforge.py) rebuilds and rotates every key of every step in device
memory, so it moves more bytes than an uncompressed cache would. This kernel rebuilds each tile of keys in
registers and never writes them. One program serves every head of a row over one split of the slots:

    for each tile of BLOCK_S slots:
        key = c_k[tile] @ U_k^T                          all KV heads at once, two halves [BLOCK_S, K * D/2]
        key = RoPE(key) at the slots' positions          cos/sin gathered from a [positions, D/2] table (L2-resident)
        score = Q_bd @ key^T * scaling, masked           Q_bd [H, K * D/2]: query head h holds its values in the
                                                          columns of its KV head and zeros elsewhere, so one
                                                          product gives every head's scores (no head expansion)
        online softmax; acc += p @ c_v[tile]             values stay latent and are shared by all heads: one
                                                          product for all H heads; U_v is applied once, at the end

so device memory sees each latent once (plus one position and one mask byte per slot). For 8-bit latents the
products run transposed by default, the slots as their rows (score^T = key @ Q_bd^T, acc^T += c_v^T @ p^T:
LAUNCH_DEFAULTS' slot_rows), and the key columns and value ranks in two power-of-two tiles where one would be padded.
Splits of the slot axis (flash-decoding) keep the GPU busy at small batch; their partial results are merged by a
second kernel, and out_h = acc_h @ U_v[h // G]^T + b_v, exact since sum_s p_s (U_v c_s + b_v) =
U_v (sum_s p_s c_s) + b_v.

Measured choices (benchmarks/NOTES.md): one program per row and split rather than per KV head (the latent
tiles and the rotations were computed once per KV head: 3x the work for SmolLM2), and a cos/sin table rather
than sin/cos per element (the transcendental functions cost more than all the loads).

Imports triton inside `try`: without it (a CPU-only install) the module loads and `available()` says False.
This file is copied flat beside modeling_kvforge.py in an exported directory; it imports only torch and triton.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU-only install: the PyTorch reference serves
    triton = None

    class OutOfResources(Exception):  # never raised without triton; defined so callers can catch it either way
        pass


def available() -> bool:
    return triton is not None


if triton is not None:

    # Steps every decode kernel shares (this file's, gqa_decode.py's, partial_rope_decode.py's). They live here, in
    # a file the modeling code imports, so that every transformers version bundles them with an export.

    @triton.jit
    def split_slots(LENGTH, slots, split, slots_per_split, LENGTH_IN_MEMORY: tl.constexpr):
        """[start, end) of the cache slots flash-decoding's split `split` reads: its share of the first `length`
        slots, the length read from device memory (a static cache's, so a CUDA graph replays it) or given."""
        if LENGTH_IN_MEMORY:
            length = tl.load(LENGTH)
        else:
            length = slots
        start = split * slots_per_split
        return start, tl.minimum(start + slots_per_split, length)

    @triton.jit
    def dequantized_tile(values, scale):
        """An 8-bit cache's tile [rows, cols] of int8 values times its rows' scales [rows], in float32. (Making the
        integers float by two adds instead of the conversion unit measured no faster on an H200, session 16.)"""
        return values.to(tl.float32) * scale.to(tl.float32)[:, None]

    @triton.jit
    def power_of_two_under(largest):
        """2^k with largest x 2^k in (2^13, 2^14]: scaled by it, values stay clear of float16's overflow (65,504) and
        of its subnormals (under 2^-14, where precision goes), exactly in any float format."""
        return tl.exp2(14.0 - tl.ceil(tl.log2(tl.maximum(largest, 1e-30))))

    @triton.jit
    def int8_rows(x):
        """x [M, N] float32 -> its rows rounded to int8 (half away from zero) by one step a row, the row's largest
        |value| / 127, and those steps [M] (an all-zero row: zeros, and a step of 1e-30 / 127). A decode kernel's
        query for an int8 x int8 -> int32 score product over an int8 cache's bytes."""
        largest = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)
        levels = x * (127.0 / largest)[:, None]
        return (levels + tl.where(levels >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8), largest / 127.0

    @triton.jit
    def largest_scale(SCALES, stride, start, end):
        """The largest of an 8-bit cache's per-slot scales SCALES[s * stride] over slots [start, end) (a split's),
        read ahead of its tiles 1,024 at a time: 2 bytes a slot."""
        largest = tl.zeros([1024], tl.float32)
        for first in range(start, end, 1024):
            offs = first + tl.arange(0, 1024)
            largest = tl.maximum(largest, tl.load(SCALES + offs * stride, mask=offs < end, other=0.0).to(tl.float32))
        return tl.max(largest)

    @triton.jit
    def unpacked_tiles(packed, scale):
        """A 4-bit cache's tile [rows, cols] of bytes (two's-complement nibbles, the even position low): its even
        and odd positions' values times the rows' scales [rows], each [rows, cols] in float32."""
        byte = packed.to(tl.int8, bitcast=True)
        return dequantized_tile((byte << 4) >> 4, scale), dequantized_tile(byte >> 4, scale)

    # Triton's interpreter (TRITON_INTERPRET=1: the CPU tests) runs no inline PTX; words_to_halves takes its bytes
    # apart by shifts there.
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def latent_words(LATENT, row, offs_s, s_ok, cols, stride_b, stride_s, FIRST: tl.constexpr, WIDTH: tl.constexpr):
        """An 8-bit latent tile's stored columns FIRST .. FIRST + WIDTH as int32 words [BLOCK_S, WIDTH / 4], four
        columns each, the lowest in the low byte (the launcher checks that strides and cols are multiples of 4)."""
        offs_w = FIRST // 4 + tl.arange(0, WIDTH // 4)
        words = LATENT.to(tl.pointer_type(tl.int32))
        return tl.load(words + row * (stride_b // 4) + offs_s[:, None] * (stride_s // 4) + offs_w[None, :],
                       mask=s_ok[:, None] & (offs_w < cols // 4)[None, :], other=0)

    @triton.jit
    def words_to_halves(words):
        """latent_words' [rows, n] words as the float16 values of their int8 bytes [rows, 4n], in column order, exact:
        each byte, its sign bit flipped (v + 128), is permuted into the low mantissa byte of 1024.0 (0x6400), two
        per register, and 1152.0 subtracted from both at once. A tile's bytes never sit one per register, which is
        what Triton's own int8 conversion costs in byte permutes (benchmarks/kernel_resources.py)."""
        if INTERPRETED:
            b0 = ((words << 24) >> 24).to(tl.float16)
            b1 = ((words << 16) >> 24).to(tl.float16)
            b2 = ((words << 8) >> 24).to(tl.float16)
            b3 = (words >> 24).to(tl.float16)
        else:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "{ .reg .b32 t, a, b, c;\n"
                "mov.b32 c, 0x64806480;\n"
                "xor.b32 t, $4, 0x80808080;\n"
                "prmt.b32 a, t, 0x64646464, 0x5140;\n"
                "prmt.b32 b, t, 0x64646464, 0x5342;\n"
                "sub.f16x2 a, a, c;\n"
                "sub.f16x2 b, b, c;\n"
                "mov.b32 {$0, $1}, a;\n"
                "mov.b32 {$2, $3}, b; }",
                "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True,
                pack=1)
        # [rows, n, 2, 2] with [.., i, j] = byte 2i + j, flattened in that order
        halves = tl.join(tl.join(b0, b2), tl.join(b1, b3))
        return tl.reshape(halves, (words.shape[0], 4 * words.shape[1]))

    @triton.jit
    def int8_to_halves(values):
        """An int8 tile, any shape, as float16, exact: words_to_halves' permutes on the tile's own registers (four
        bytes a register as loaded), so the tile keeps its layout and no byte sits in a register of its own.
        Declared impure so that Triton converts the tile where it was loaded: a pure conversion it moves past the
        layout change into the products' operand layout, where each byte sits apart (two to a register) and takes
        a permute of its own, and a tile that feeds two products is converted twice (the partial-RoPE kernel's
        latent, offline sm_90: 1,228 loop instructions per tile, 402 of them permutes; 667 impure)."""
        if INTERPRETED:
            return values.to(tl.float16)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, c;\n"
            "mov.b32 c, 0x64806480;\n"
            "xor.b32 t, $2, 0x80808080;\n"
            "prmt.b32 $0, t, 0x64646464, 0x4140;\n"
            "prmt.b32 $1, t, 0x64646464, 0x4342;\n"
            "sub.f16x2 $0, $0, c;\n"
            "sub.f16x2 $1, $1, c; }",
            "=r,=r,r", [values], dtype=tl.float16, is_pure=False, pack=4)

    @triton.jit
    def nibbles_to_halves(words):
        """A 4-bit latent's words [rows, n] (latent_words: four bytes each, byte j holding rank 2j in its low nibble
        and rank 2j + 1 in its high one, two's complement) as the float16 values of their even and odd ranks, each
        [rows, 4n] in byte order, exact: every nibble's sign bit flipped (v + 8), two nibbles masked into the low
        mantissa bits of 1024.0 (0x6400) per register by one lop3, and 1032.0 subtracted from both at once."""
        if INTERPRETED:
            lo0, hi0 = ((words << 28) >> 28).to(tl.float16), ((words << 24) >> 28).to(tl.float16)
            lo1, hi1 = ((words << 20) >> 28).to(tl.float16), ((words << 16) >> 28).to(tl.float16)
            lo2, hi2 = ((words << 12) >> 28).to(tl.float16), ((words << 8) >> 28).to(tl.float16)
            lo3, hi3 = ((words << 4) >> 28).to(tl.float16), (words >> 28).to(tl.float16)
        else:
            lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = tl.inline_asm_elementwise(
                "{ .reg .b32 t, s, a, b, c, d, m;\n"
                "mov.b32 m, 0x64086408;\n"
                "xor.b32 t, $8, 0x88888888;\n"
                "lop3.b32 a, t, 0x000F000F, 0x64006400, 0xEA;\n"  # (t & mask) | 1024.0: the low nibbles of bytes 0, 2
                "shr.u32 s, t, 8;\n"
                "lop3.b32 b, s, 0x000F000F, 0x64006400, 0xEA;\n"  # of bytes 1, 3
                "shr.u32 s, t, 4;\n"
                "lop3.b32 c, s, 0x000F000F, 0x64006400, 0xEA;\n"  # the high nibbles of bytes 0, 2
                "shr.u32 s, t, 12;\n"
                "lop3.b32 d, s, 0x000F000F, 0x64006400, 0xEA;\n"  # of bytes 1, 3
                "sub.f16x2 a, a, m;\n"
                "sub.f16x2 b, b, m;\n"
                "sub.f16x2 c, c, m;\n"
                "sub.f16x2 d, d, m;\n"
                "mov.b32 {$0, $2}, a;\n"
                "mov.b32 {$1, $3}, b;\n"
                "mov.b32 {$4, $6}, c;\n"
                "mov.b32 {$5, $7}, d; }",
                "=h,=h,=h,=h,=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        # as words_to_halves: [rows, n, 2, 2] with [.., i, j] = byte 2i + j, flattened in that order
        even = tl.reshape(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)), (words.shape[0], 4 * words.shape[1]))
        odd = tl.reshape(tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)), (words.shape[0], 4 * words.shape[1]))
        return even, odd

    @triton.jit
    def key_tile(K_LATENT, row, offs_s, s_ok, offs_rk, rk_ok, stride_kb, stride_ks):
        """One tile's key latents as stored [BLOCK_S, cols] (bytes of a low-bit cache, not yet dequantized)."""
        return tl.load(K_LATENT + row * stride_kb + offs_s[:, None] * stride_ks + offs_rk[None, :],
                       mask=s_ok[:, None] & rk_ok[None, :], other=0)

    @triton.jit
    def slot_values(POSITIONS, VALID, K_SCALE, V_SCALE, row, offs_s, s_ok, stride_pb, stride_mb, stride_ksb,
                    stride_kss, stride_vsb, stride_vss, HAS_SCALES: tl.constexpr):
        """One tile's values per slot [BLOCK_S]: RoPE positions, visibility bytes (nonzero: visible), and a low-bit
        cache's key and value scales (ones without scales)."""
        position = tl.load(POSITIONS + row * stride_pb + offs_s, mask=s_ok, other=0)
        visible = tl.load(VALID + row * stride_mb + offs_s, mask=s_ok, other=0)
        if HAS_SCALES:
            k_scale = tl.load(K_SCALE + row * stride_ksb + offs_s * stride_kss, mask=s_ok, other=0.0)
            v_scale = tl.load(V_SCALE + row * stride_vsb + offs_s * stride_vss, mask=s_ok, other=0.0)
        else:
            k_scale = tl.full(offs_s.shape, 1.0, tl.float32)
            v_scale = k_scale
        return position, visible, k_scale, v_scale

    @triton.jit
    def online_softmax_tile(scores, running_max, running_sum):
        """One tile of flash attention's online softmax over scores [rows, BLOCK_S] (fp32, masked = -inf):
        the new running max, the factor that rescales what the tiles before accumulated, the tile's weights,
        and the new running sum."""
        tile_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A tile (or a whole split) can be fully masked: keep exp() away from (-inf) - (-inf).
        safe_max = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        alpha = tl.exp(running_max - safe_max)
        p = tl.exp(scores - safe_max[:, None])
        return tile_max, alpha, p, running_sum * alpha + tl.sum(p, axis=1)

    @triton.jit
    def online_softmax_slot_rows(scores, running_max, running_sum):
        """online_softmax_tile for scores laid out [BLOCK_S, heads] (slots as rows): the same four results, the
        softmax taken down each column."""
        tile_max = tl.maximum(running_max, tl.max(scores, axis=0))
        safe_max = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        alpha = tl.exp(running_max - safe_max)
        p = tl.exp(scores - safe_max[None, :])
        return tile_max, alpha, p, running_sum * alpha + tl.sum(p, axis=0)

    @triton.jit
    def _column_group(Q, K_WEIGHT, K_BIAS, row, stride_qb, first_kv, kv_heads, k_rank, head, head_ok, group, offs_rk,
                      rk_ok, FIRST: tl.constexpr, COLS: tl.constexpr, HALF: tl.constexpr, KV_PER_PROGRAM: tl.constexpr,
                      PACKED: tl.constexpr, HAS_K_BIAS: tl.constexpr, HOLD_WEIGHT: tl.constexpr):
        """What one group of key columns needs for the whole program: the program's columns FIRST .. FIRST + COLS
        (column c: KV head first_kv + c // HALF, frequency pair c % HALF; masked past the program's KV heads). The
        block-diagonal query halves [BLOCK_H, COLS] (head h keeps its dims in its KV head's columns, so one product
        gives every head's scores without expanding heads), U_k transposed into the same columns per half
        [BLOCK_RK, COLS] (k_up.weight row kv * D + pair [+ HALF], column r; a 4-bit cache's even and odd ranks as
        two tiles each; HOLD_WEIGHT: else not loaded), the key bias's halves [COLS] (zeros without), and the
        weight's column offsets and mask for a caller that reads U_k in chunks."""
        offs_c = FIRST + tl.arange(0, COLS)
        col_head = first_kv + offs_c // HALF
        col_pair = offs_c % HALF
        col_ok = (offs_c // HALF < KV_PER_PROGRAM) & (col_head < kv_heads)
        own = (col_head[None, :] == (head // group)[:, None]) & head_ok[:, None] & col_ok[None, :]
        q_ptr = Q + row * stride_qb + head[:, None] * (2 * HALF) + col_pair[None, :]
        q_lo = tl.load(q_ptr, mask=own, other=0.0)
        q_hi = tl.load(q_ptr + HALF, mask=own, other=0.0)
        w_cols = (col_head[None, :] * (2 * HALF) + col_pair[None, :]) * k_rank
        w_ok = rk_ok[:, None] & col_ok[None, :]
        if PACKED:  # U_k's even and odd rows, for the even and odd ranks
            w_ptr = K_WEIGHT + w_cols + 2 * offs_rk[:, None]
            w_lo_odd = tl.load(w_ptr + 1, mask=w_ok, other=0.0)
            w_hi_odd = tl.load(w_ptr + 1 + HALF * k_rank, mask=w_ok, other=0.0)
        else:
            w_ptr = K_WEIGHT + w_cols + offs_rk[:, None]
        if HOLD_WEIGHT:
            w_lo = tl.load(w_ptr, mask=w_ok, other=0.0)
            w_hi = tl.load(w_ptr + HALF * k_rank, mask=w_ok, other=0.0)
        else:  # the caller reads U_k in chunks
            w_lo = tl.zeros([1], tl.float32)
            w_hi = w_lo
        if not PACKED:  # unused
            w_lo_odd, w_hi_odd = w_lo, w_hi
        if HAS_K_BIAS:
            bias_ptr = K_BIAS + col_head * (2 * HALF) + col_pair
            b_lo = tl.load(bias_ptr, mask=col_ok, other=0.0).to(tl.float32)
            b_hi = tl.load(bias_ptr + HALF, mask=col_ok, other=0.0).to(tl.float32)
        else:
            b_lo = tl.zeros([COLS], tl.float32)
            b_hi = b_lo
        return q_lo, q_hi, w_lo, w_hi, w_lo_odd, w_hi_odd, b_lo, b_hi, w_cols, col_ok

    @triton.jit
    def _rebuilt_keys(c_even, c_odd, w_lo, w_hi, w_lo_odd, w_hi_odd, PACKED: tl.constexpr):
        """One tile's keys in one column group, before RoPE: c_k @ U_k^T per half, [BLOCK_S, COLS] in float32 (a
        4-bit cache: its even and odd ranks' products summed)."""
        key_lo = tl.dot(c_even, w_lo)
        key_hi = tl.dot(c_even, w_hi)
        if PACKED:
            key_lo += tl.dot(c_odd, w_lo_odd)
            key_hi += tl.dot(c_odd, w_hi_odd)
        return key_lo, key_hi

    @triton.jit
    def _rotated_keys(key_lo, key_hi, b_lo, b_hi, cos_half, sin_half, key_scale, dtype: tl.constexpr,
                      HAS_K_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, COLS: tl.constexpr, HALF: tl.constexpr,
                      SCALED_KEYS: tl.constexpr):
        """One column group's keys [BLOCK_S, COLS] per half, ready for the score product in `dtype`: the bias added
        and RoPE applied in float32 (the reference rotates in the cache's dtype: this is a little more exact).
        cos/sin [BLOCK_S, HALF] are the same for every KV head: repeated across the columns. SCALED_KEYS: the keys
        times their slots' scales [BLOCK_S] first (latents not yet scaled, and a bias that must not be)."""
        if SCALED_KEYS:
            key_lo *= key_scale[:, None]
            key_hi *= key_scale[:, None]
        if HAS_K_BIAS:
            key_lo += b_lo[None, :]
            key_hi += b_hi[None, :]
        cos = tl.reshape(tl.broadcast_to(cos_half[:, None, :], (BLOCK_S, COLS // HALF, HALF)), (BLOCK_S, COLS))
        sin = tl.reshape(tl.broadcast_to(sin_half[:, None, :], (BLOCK_S, COLS // HALF, HALF)), (BLOCK_S, COLS))
        return (key_lo * cos - key_hi * sin).to(dtype), (key_hi * cos + key_lo * sin).to(dtype)

    @triton.jit
    def _rotated_scores(key_lo, key_hi, b_lo, b_hi, cos_half, sin_half, q_lo, q_hi, key_scale,
                        HAS_K_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, COLS: tl.constexpr, HALF: tl.constexpr,
                        SLOT_ROWS: tl.constexpr, SCALED_KEYS: tl.constexpr):
        """One column group's share of a tile's scores [BLOCK_H, BLOCK_S] (SLOT_ROWS: [BLOCK_S, BLOCK_H], from the
        query halves given transposed, [COLS, BLOCK_H]): _rotated_keys, then the block-diagonal query's product."""
        rot_lo, rot_hi = _rotated_keys(key_lo, key_hi, b_lo, b_hi, cos_half, sin_half, key_scale, q_lo.dtype,
                                       HAS_K_BIAS, BLOCK_S, COLS, HALF, SCALED_KEYS)
        if SLOT_ROWS:  # the rotated keys as the left operand, in the rows their product left them in
            scores = tl.dot(rot_lo, q_lo) + tl.dot(rot_hi, q_hi)
        else:
            scores = tl.dot(q_lo, tl.trans(rot_lo)) + tl.dot(q_hi, tl.trans(rot_hi))
        return scores

    @triton.jit
    def _merged_halves(w_lo, w_hi, q_lo, q_hi, BLOCK_RK: tl.constexpr, COLS: tl.constexpr, BLOCK_H: tl.constexpr):
        """A column group's U_k halves interleaved column by column, [BLOCK_RK, 2 * COLS], and its (transposed) query
        halves likewise, [2 * COLS, BLOCK_H]: one key product and one score product per group instead of two each."""
        w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_RK, 2 * COLS))
        q = tl.reshape(tl.permute(tl.join(q_lo, q_hi), (0, 2, 1)), (2 * COLS, BLOCK_H))
        return w, q

    @triton.jit
    def _merged_rotated_scores(c_k, w, q, b_lo, b_hi, cos_half, sin_half, key_scale, HAS_K_BIAS: tl.constexpr,
                               BLOCK_S: tl.constexpr, COLS: tl.constexpr, HALF: tl.constexpr,
                               SCALED_KEYS: tl.constexpr):
        """_rebuilt_keys then _rotated_scores (SLOT_ROWS) over _merged_halves' interleaved columns: the key product's
        [BLOCK_S, 2 * COLS] split into its halves in registers (no layout change), rotated, joined back."""
        key_lo, key_hi = tl.split(tl.reshape(tl.dot(c_k, w), (BLOCK_S, COLS, 2)))
        rot_lo, rot_hi = _rotated_keys(key_lo, key_hi, b_lo, b_hi, cos_half, sin_half, key_scale, q.dtype,
                                       HAS_K_BIAS, BLOCK_S, COLS, HALF, SCALED_KEYS)
        return tl.dot(tl.reshape(tl.join(rot_lo, rot_hi), (BLOCK_S, 2 * COLS)), q)

    @triton.jit
    def _accumulated_values(acc, acc_odd, p, alpha, V_LATENT, v_scale, row, offs_s, s_ok, stride_vb, stride_vs,
                            v_cols, HAS_SCALES: tl.constexpr, PACKED: tl.constexpr, SLOT_ROWS: tl.constexpr,
                            WORD_LOADS: tl.constexpr, FIRST: tl.constexpr, WIDTH: tl.constexpr):
        """One tile of value latents (stored columns FIRST .. FIRST + WIDTH, of v_cols) added to the running acc
        [BLOCK_H, cols] (a 4-bit cache: the even ranks' acc and the odd ones' acc_odd), rescaled by alpha:
        acc * alpha + p @ c_v. SLOT_ROWS: p [BLOCK_S, BLOCK_H] and the accumulators transposed, [cols, BLOCK_H]:
        acc + c_v^T @ p. WORD_LOADS: 8-bit latents read as words and made float16, times their scales in float16 (p
        is float16 then)."""
        dtype = p.dtype
        if WORD_LOADS and PACKED:
            v_even, v_odd = nibbles_to_halves(latent_words(V_LATENT, row, offs_s, s_ok, v_cols, stride_vb, stride_vs,
                                                           FIRST, WIDTH))
            half_scale = v_scale.to(tl.float16)[:, None]
            v_even, v_odd = v_even * half_scale, v_odd * half_scale
        elif WORD_LOADS:
            c_v = words_to_halves(latent_words(V_LATENT, row, offs_s, s_ok, v_cols, stride_vb, stride_vs, FIRST, WIDTH))
            c_v = c_v * v_scale.to(tl.float16)[:, None]
        else:
            offs_rv = FIRST + tl.arange(0, WIDTH)
            c_v = tl.load(V_LATENT + row * stride_vb + offs_s[:, None] * stride_vs + offs_rv[None, :],
                          mask=s_ok[:, None] & (offs_rv < v_cols)[None, :], other=0)
        if PACKED:
            if not WORD_LOADS:
                v_even, v_odd = unpacked_tiles(c_v, v_scale)
            if SLOT_ROWS:
                acc = acc * alpha[None, :] + tl.dot(tl.trans(v_even.to(dtype)), p)
                acc_odd = acc_odd * alpha[None, :] + tl.dot(tl.trans(v_odd.to(dtype)), p)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v_even.to(dtype))
                acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd.to(dtype))
        else:
            if HAS_SCALES and not WORD_LOADS:
                c_v = dequantized_tile(c_v, v_scale).to(dtype)
            if SLOT_ROWS:
                acc = acc * alpha[None, :] + tl.dot(tl.trans(c_v), p)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, c_v)
        return acc, acc_odd

    @triton.jit
    def _store_values(ACC, stat, acc, acc_odd, offs_rv, head_ok, ACC_WIDTH: tl.constexpr, PACKED: tl.constexpr,
                      SLOT_ROWS: tl.constexpr):
        """A program's value accumulators into ACC rows of ACC_WIDTH columns in rank order: stored column j is rank
        j, or (PACKED) ranks 2j and 2j + 1, the even and odd accumulators interleaved back. SLOT_ROWS: the
        accumulators are [cols, BLOCK_H]."""
        if SLOT_ROWS:
            columns = stat[None, :] * ACC_WIDTH + (2 if PACKED else 1) * offs_rv[:, None]
            ok = head_ok[None, :]
        else:
            columns = stat[:, None] * ACC_WIDTH + (2 if PACKED else 1) * offs_rv[None, :]
            ok = head_ok[:, None]
        tl.store(ACC + columns, acc, mask=ok)
        if PACKED:
            tl.store(ACC + columns + 1, acc_odd, mask=ok)

    @triton.jit
    def _latent_decode_kernel(
        Q, K_LATENT, V_LATENT, K_WEIGHT, K_BIAS, POSITIONS, VALID, ROPE,  # inputs
        K_SCALE, V_SCALE,  # a low-bit cache's scales [B, S, 1] (HAS_SCALES), else unused
        ACC, MAX, SUM,  # outputs, per split
        stride_qb,  # q [B, H, D], heads then dims contiguous
        stride_kb, stride_ks,  # k_latent [B, S, Rk] (4 bits: [B, S, Rk / 2] bytes), last dim contiguous
        stride_vb, stride_vs,  # v_latent [B, S, Rv] (4 bits: [B, S, Rv / 2] bytes), last dim contiguous
        stride_pb, stride_mb,  # positions [B, S], valid [B, S]
        stride_ksb, stride_kss, stride_vsb, stride_vss,  # k_scale, v_scale [B, S, 1]
        slots, heads, group, kv_heads, k_rank, v_rank, slots_per_split, splits, scaling,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_RV2: tl.constexpr,
        ACC_WIDTH: tl.constexpr, SLOT_ROWS: tl.constexpr, HAS_K_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr,
        CHUNK_RK: tl.constexpr, PACKED: tl.constexpr, KV_PER_PROGRAM: tl.constexpr, STAT_H: tl.constexpr,
        PREFETCH: tl.constexpr, WORD_LOADS: tl.constexpr, MERGED_HALVES: tl.constexpr,
        PREFETCH_SLOTS: tl.constexpr,
    ):
        # PACKED (a 4-bit cache): BLOCK_RK / BLOCK_RV cover half the ranks, one byte holding ranks 2j and 2j + 1;
        # the even and odd ranks are two tiles, each with its own rows of U_k and its own value accumulator.
        # A program serves KV_PER_PROGRAM KV heads (program_id(2) picks which): their query heads are its BLOCK_H
        # rows and their HALF-wide column groups its key columns: BLOCK_C of them, then BLOCK_C2 more when
        # BLOCK_C2 > 0 (two power-of-two tiles where one would be padded: SmolLM2's 3 x 32 as 64 + 32, not 128).
        # Likewise the value latent's stored columns: BLOCK_RV, then BLOCK_RV2 more (a rank of 144 as 128 + 16, not
        # 256), each with its own accumulator. STAT_H: query heads per row in ACC/MAX/SUM; ACC_WIDTH: ACC's columns.
        # WORD_LOADS (8-bit latents, U_k held whole, no prefetch): the latents read as 32-bit words and made float16
        # in registers (words_to_halves), U_k in float16; each slot's key scale multiplies its scores rather than its
        # latents ((s c) U = s (c U)), its value scale its float16 values. MERGED_HALVES (SLOT_ROWS, U_k held whole,
        # not PACKED): each column group's two halves in one key product and one score product.
        split = tl.program_id(0)
        row = tl.program_id(1)
        first_kv = tl.program_id(2) * KV_PER_PROGRAM
        dtype = Q.dtype.element_ty

        offs_h = tl.arange(0, BLOCK_H)  # the program's query heads: first_kv * group + offs_h
        offs_p = tl.arange(0, HALF)
        offs_rk = tl.arange(0, BLOCK_RK)
        offs_rv = tl.arange(0, BLOCK_RV)
        head = first_kv * group + offs_h
        head_ok = (offs_h < KV_PER_PROGRAM * group) & (head < heads)

        # U_k is held for the whole program when it fits (CHUNK_RK == BLOCK_RK); large key ranks read it in
        # CHUNK_RK-row chunks per tile instead (two [BLOCK_RK, BLOCK_C] tiles of 256 x 128 need 128 KiB of shared
        # memory in bf16), with one column group only.
        k_cols = k_rank // 2 if PACKED else k_rank  # the latent's stored columns
        v_cols = v_rank // 2 if PACKED else v_rank
        rk_ok = offs_rk < k_cols
        q_lo, q_hi, w_lo, w_hi, w_lo_odd, w_hi_odd, b_lo, b_hi, w_cols, col_ok = _column_group(
            Q, K_WEIGHT, K_BIAS, row, stride_qb, first_kv, kv_heads, k_rank, head, head_ok, group, offs_rk, rk_ok,
            0, BLOCK_C, HALF, KV_PER_PROGRAM, PACKED, HAS_K_BIAS, PACKED or CHUNK_RK == BLOCK_RK)
        if BLOCK_C2 > 0:
            q2_lo, q2_hi, w2_lo, w2_hi, w2_lo_odd, w2_hi_odd, b2_lo, b2_hi, _, _ = _column_group(
                Q, K_WEIGHT, K_BIAS, row, stride_qb, first_kv, kv_heads, k_rank, head, head_ok, group, offs_rk, rk_ok,
                BLOCK_C, BLOCK_C2, HALF, KV_PER_PROGRAM, PACKED, HAS_K_BIAS, True)
        if WORD_LOADS:  # the latents' integers are exact in float16, and U_k's values keep more bits there
            w_lo, w_hi = w_lo.to(tl.float16), w_hi.to(tl.float16)
            if BLOCK_C2 > 0:
                w2_lo, w2_hi = w2_lo.to(tl.float16), w2_hi.to(tl.float16)
            if PACKED:  # U_k's rows for the odd ranks
                w_lo_odd, w_hi_odd = w_lo_odd.to(tl.float16), w_hi_odd.to(tl.float16)
                if BLOCK_C2 > 0:
                    w2_lo_odd, w2_hi_odd = w2_lo_odd.to(tl.float16), w2_hi_odd.to(tl.float16)
        if SLOT_ROWS:  # the query halves as the right operand of the score product, [columns, BLOCK_H]
            q_lo, q_hi = tl.trans(q_lo), tl.trans(q_hi)
            if BLOCK_C2 > 0:
                q2_lo, q2_hi = tl.trans(q2_lo), tl.trans(q2_hi)
        if MERGED_HALVES:
            w_merged, q_merged = _merged_halves(w_lo, w_hi, q_lo, q_hi, BLOCK_RK, BLOCK_C, BLOCK_H)
            if BLOCK_C2 > 0:
                w2_merged, q2_merged = _merged_halves(w2_lo, w2_hi, q2_lo, q2_hi, BLOCK_RK, BLOCK_C2, BLOCK_H)

        running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_H], tl.float32)
        if SLOT_ROWS:  # every product with the slots as its rows: the accumulators transposed
            acc = tl.zeros([BLOCK_RV, BLOCK_H], tl.float32)
        else:
            acc = tl.zeros([BLOCK_H, BLOCK_RV], tl.float32)
        acc_odd = tl.zeros_like(acc)  # PACKED: the odd value ranks
        if BLOCK_RV2 > 0:  # the value columns past BLOCK_RV
            offs_rv2 = BLOCK_RV + tl.arange(0, BLOCK_RV2)
            if SLOT_ROWS:
                acc2 = tl.zeros([BLOCK_RV2, BLOCK_H], tl.float32)
            else:
                acc2 = tl.zeros([BLOCK_H, BLOCK_RV2], tl.float32)
            acc2_odd = tl.zeros_like(acc2)

        start = split * slots_per_split
        end = tl.minimum(start + slots_per_split, slots)
        if PREFETCH:  # the first tile's keys; each iteration then loads the next tile's before computing
            offs_s = start + tl.arange(0, BLOCK_S)
            next_k = key_tile(K_LATENT, row, offs_s, offs_s < end, offs_rk, rk_ok, stride_kb, stride_ks)
        if PREFETCH_SLOTS:  # likewise the first tile's values per slot
            offs_s = start + tl.arange(0, BLOCK_S)
            next_slots = slot_values(POSITIONS, VALID, K_SCALE, V_SCALE, row, offs_s, offs_s < end, stride_pb,
                                     stride_mb, stride_ksb, stride_kss, stride_vsb, stride_vss, HAS_SCALES)
        for tile in range(start, end, BLOCK_S):
            offs_s = tile + tl.arange(0, BLOCK_S)
            s_ok = offs_s < end
            # Every load a tile needs is issued before its first dot (their latencies overlap one another's), and
            # with PREFETCH_SLOTS the values per slot a tile ahead: their consumers come early in the tile's chain
            # (the positions feed the cos/sin gather, itself a second wait on L2), which Triton's pipeliner leaves
            # alone, and at two programs per SM each such wait stalled the tile (Nsight Compute, session 20).
            if PREFETCH_SLOTS:
                position, visible, k_scale, v_scale = next_slots
                offs_next = offs_s + BLOCK_S
                next_slots = slot_values(POSITIONS, VALID, K_SCALE, V_SCALE, row, offs_next, offs_next < end,
                                         stride_pb, stride_mb, stride_ksb, stride_kss, stride_vsb, stride_vss,
                                         HAS_SCALES)
            else:
                position, visible, k_scale, v_scale = slot_values(POSITIONS, VALID, K_SCALE, V_SCALE, row, offs_s, s_ok,
                                                                  stride_pb, stride_mb, stride_ksb, stride_kss,
                                                                  stride_vsb, stride_vss, HAS_SCALES)
            # cos/sin gathered once per tile from the [positions, D] table (L2-resident), shared by the groups.
            rope_ptr = ROPE + position[:, None] * (2 * HALF) + offs_p[None, :]
            cos_half = tl.load(rope_ptr).to(tl.float32)  # a float16 table (half_rope_table) rotates in float32 too
            sin_half = tl.load(rope_ptr + HALF).to(tl.float32)
            if PREFETCH:
                # This tile's keys were loaded in the previous iteration: issue the next tile's now, so their latency
                # hides behind this tile's dots (Triton's pipeliner does not take loads that are dequantized before
                # the dot). Only the keys: holding the values too spills (benchmarks/kernel_resources.py).
                k_tile = next_k
                offs_next = offs_s + BLOCK_S
                next_k = key_tile(K_LATENT, row, offs_next, offs_next < end, offs_rk, rk_ok, stride_kb, stride_ks)
            elif WORD_LOADS:
                k_tile = latent_words(K_LATENT, row, offs_s, s_ok, k_cols, stride_kb, stride_ks, 0, BLOCK_RK)
            elif PACKED or CHUNK_RK == BLOCK_RK:  # U_k held whole: this tile's keys loaded whole, now
                k_tile = key_tile(K_LATENT, row, offs_s, s_ok, offs_rk, rk_ok, stride_kb, stride_ks)
            if PACKED and WORD_LOADS:  # the nibbles as float16 integers; the key scales go onto the scores
                c_even, c_odd = nibbles_to_halves(k_tile)
            elif PACKED:  # low-bit latents: their bytes read, dequantized in registers
                c_even, c_odd = unpacked_tiles(k_tile, k_scale)
                c_even, c_odd = c_even.to(dtype), c_odd.to(dtype)
            elif WORD_LOADS:  # the key scales go onto the scores
                c_even = words_to_halves(k_tile)
                c_odd = c_even  # unused
            elif CHUNK_RK == BLOCK_RK:
                c_even = k_tile
                if HAS_SCALES:
                    c_even = dequantized_tile(c_even, k_scale).to(dtype)
                c_odd = c_even  # unused
            if MERGED_HALVES:
                key_lo, key_hi = c_even, c_odd  # unused: the merged products rebuild the keys below
            elif PACKED or CHUNK_RK == BLOCK_RK:
                key_lo, key_hi = _rebuilt_keys(c_even, c_odd, w_lo, w_hi, w_lo_odd, w_hi_odd, PACKED)
            else:
                key_lo = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
                key_hi = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
                for first in tl.static_range(0, BLOCK_RK, CHUNK_RK):
                    offs_r = first + tl.arange(0, CHUNK_RK)
                    r_ok = offs_r < k_rank
                    c_k = tl.load(K_LATENT + row * stride_kb + offs_s[:, None] * stride_ks + offs_r[None, :],
                                  mask=s_ok[:, None] & r_ok[None, :], other=0)
                    if HAS_SCALES:
                        c_k = dequantized_tile(c_k, k_scale).to(dtype)
                    w_ptr = K_WEIGHT + w_cols + offs_r[:, None]
                    w_lo = tl.load(w_ptr, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                    w_hi = tl.load(w_ptr + HALF * k_rank, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
                    key_lo += tl.dot(c_k, w_lo)
                    key_hi += tl.dot(c_k, w_hi)
            # WORD_LOADS: each slot's key scale multiplies its scores ((s c) U = s (c U)), or where a key bias (which
            # it must not scale) is added, the keys before it.
            if WORD_LOADS and HAS_K_BIAS:
                key_scale = k_scale.to(tl.float32)
            else:
                key_scale = scaling  # unread
            if MERGED_HALVES:
                scores = _merged_rotated_scores(c_even, w_merged, q_merged, b_lo, b_hi, cos_half, sin_half, key_scale,
                                                HAS_K_BIAS, BLOCK_S, BLOCK_C, HALF, WORD_LOADS and HAS_K_BIAS)
                if BLOCK_C2 > 0:
                    scores += _merged_rotated_scores(c_even, w2_merged, q2_merged, b2_lo, b2_hi, cos_half, sin_half,
                                                     key_scale, HAS_K_BIAS, BLOCK_S, BLOCK_C2, HALF,
                                                     WORD_LOADS and HAS_K_BIAS)
            else:
                scores = _rotated_scores(key_lo, key_hi, b_lo, b_hi, cos_half, sin_half, q_lo, q_hi, key_scale,
                                         HAS_K_BIAS, BLOCK_S, BLOCK_C, HALF, SLOT_ROWS, WORD_LOADS and HAS_K_BIAS)
                if BLOCK_C2 > 0:
                    key_lo, key_hi = _rebuilt_keys(c_even, c_odd, w2_lo, w2_hi, w2_lo_odd, w2_hi_odd, PACKED)
                    scores += _rotated_scores(key_lo, key_hi, b2_lo, b2_hi, cos_half, sin_half, q2_lo, q2_hi,
                                              key_scale, HAS_K_BIAS, BLOCK_S, BLOCK_C2, HALF, SLOT_ROWS,
                                              WORD_LOADS and HAS_K_BIAS)
            valid = visible != 0
            if WORD_LOADS and not HAS_K_BIAS:
                slot_scaling = k_scale.to(tl.float32) * scaling
            else:
                slot_scaling = tl.full([BLOCK_S], scaling, tl.float32)
            if SLOT_ROWS:
                scores = tl.where(valid[:, None], scores * slot_scaling[:, None], float("-inf"))
                running_max, alpha, p, running_sum = online_softmax_slot_rows(scores, running_max, running_sum)
            else:
                scores = tl.where(valid[None, :], scores * slot_scaling[None, :], float("-inf"))
                running_max, alpha, p, running_sum = online_softmax_tile(scores, running_max, running_sum)
            p = p.to(tl.float16 if WORD_LOADS else dtype)
            # The odd accumulators are reassigned only when PACKED: otherwise they would ride the loop unused.
            if PACKED:
                acc, acc_odd = _accumulated_values(acc, acc_odd, p, alpha, V_LATENT, v_scale, row, offs_s, s_ok,
                                                   stride_vb, stride_vs, v_cols, HAS_SCALES, PACKED, SLOT_ROWS,
                                                   WORD_LOADS, 0, BLOCK_RV)
            else:
                acc, _unused = _accumulated_values(acc, acc_odd, p, alpha, V_LATENT, v_scale, row, offs_s, s_ok,
                                                   stride_vb, stride_vs, v_cols, HAS_SCALES, PACKED, SLOT_ROWS,
                                                   WORD_LOADS, 0, BLOCK_RV)
            if BLOCK_RV2 > 0 and PACKED:
                acc2, acc2_odd = _accumulated_values(acc2, acc2_odd, p, alpha, V_LATENT, v_scale, row, offs_s, s_ok,
                                                     stride_vb, stride_vs, v_cols, HAS_SCALES, PACKED, SLOT_ROWS,
                                                     WORD_LOADS, BLOCK_RV, BLOCK_RV2)
            elif BLOCK_RV2 > 0:
                acc2, _unused = _accumulated_values(acc2, acc2_odd, p, alpha, V_LATENT, v_scale, row, offs_s, s_ok,
                                                    stride_vb, stride_vs, v_cols, HAS_SCALES, PACKED, SLOT_ROWS,
                                                    WORD_LOADS, BLOCK_RV, BLOCK_RV2)

        stat = (row * splits + split) * STAT_H + head  # max / sum [B, splits, STAT_H]; acc adds its ranks
        _store_values(ACC, stat, acc, acc_odd, offs_rv, head_ok, ACC_WIDTH, PACKED, SLOT_ROWS)
        if BLOCK_RV2 > 0:
            _store_values(ACC, stat, acc2, acc2_odd, offs_rv2, head_ok, ACC_WIDTH, PACKED, SLOT_ROWS)
        tl.store(MAX + stat, running_max, mask=head_ok)
        tl.store(SUM + stat, running_sum, mask=head_ok)


    @triton.jit
    def _merge_splits_kernel(
        ACC, MAX, SUM, OUT,  # acc [B, splits, BLOCK_H, BLOCK_RV], max / sum [B, splits, BLOCK_H]; out [K, B, G, Rv]
        splits, batch, group, v_rank,
        BLOCK_H: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    ):
        """Flash-decoding's second stage, per (row, head): weights exp(m_split - m); fully masked splits weigh 0.
        Written KV head first, so that the value up-projection is one batched GEMM per KV head over B x G rows."""
        head = tl.program_id(0)
        row = tl.program_id(1)
        offs_split = tl.arange(0, BLOCK_SPLITS)
        offs_rv = tl.arange(0, BLOCK_RV)
        split_ok = offs_split < splits
        stat = (row * splits + offs_split) * BLOCK_H + head
        split_max = tl.load(MAX + stat, mask=split_ok, other=float("-inf"))
        split_sum = tl.load(SUM + stat, mask=split_ok, other=0.0)
        overall = tl.max(split_max, axis=0)  # finite: every row has a visible slot
        weight = tl.where(split_max == float("-inf"), 0.0, tl.exp(split_max - overall))
        # Columns past v_rank may never have been written (a kernel's tiles narrower than ACC): not read.
        acc = tl.load(ACC + stat[:, None] * BLOCK_RV + offs_rv[None, :],
                      mask=split_ok[:, None] & (offs_rv < v_rank)[None, :], other=0.0)
        mixed = tl.sum(acc * weight[:, None], axis=0) / tl.sum(split_sum * weight, axis=0)
        out_row = ((head // group) * batch + row) * group + head % group
        tl.store(OUT + out_row * v_rank + offs_rv, mixed.to(OUT.dtype.element_ty), mask=offs_rv < v_rank)

    @triton.jit
    def _merged_values_kernel(
        ACC, MAX, SUM, UP, BIAS, OUT,  # acc, max, sum: _merge_splits_kernel's; up [K, Dv, Rv]; bias [K, Dv]
        # out [B, K, G, Dv]
        splits, group, v_rank, v_dim, stride_uk, stride_ob, stride_ok,
        BLOCK_H: tl.constexpr, BLOCK_RV: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """_merge_splits_kernel and the value up-projection in one, per (KV head, row): the group's merged latents
        [G, Rv], rounded to the output's dtype as the GEMM's input would be, times U_v^T [Rv, Dv] plus the bias,
        written [B, K, G, Dv]. Where the two-step path writes the latents, reads them back in a batched GEMM, and
        first copies the bias over the GEMM's output."""
        kv = tl.program_id(0)
        row = tl.program_id(1)
        dtype = OUT.dtype.element_ty
        offs_g = tl.arange(0, BLOCK_G)
        offs_split = tl.arange(0, BLOCK_SPLITS)
        offs_rv = tl.arange(0, BLOCK_RV)
        offs_dv = tl.arange(0, BLOCK_DV)
        g_ok = offs_g < group
        rv_ok = offs_rv < v_rank
        dv_ok = offs_dv < v_dim
        heads = kv * group + offs_g
        stats = (row * splits + offs_split)[:, None] * BLOCK_H + heads[None, :]  # [BLOCK_SPLITS, BLOCK_G]
        split_max = tl.load(MAX + stats, mask=(offs_split < splits)[:, None] & g_ok[None, :], other=float("-inf"))
        overall = tl.max(split_max, axis=0)  # finite for a real head: every row has a visible slot
        overall = tl.where(g_ok, overall, 0.0)
        # Each split's weight exp(m_split - m) once, for its share of both the sum and the latents; fully masked
        # splits weigh 0.
        total = tl.zeros([BLOCK_G], tl.float32)
        mixed = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
        for split in range(0, splits):
            stat = (row * splits + split) * BLOCK_H + heads
            split_weight = tl.load(MAX + stat, mask=g_ok, other=float("-inf"))
            split_weight = tl.where(split_weight == float("-inf"), 0.0, tl.exp(split_weight - overall))
            total += tl.load(SUM + stat, mask=g_ok, other=0.0) * split_weight
            # Columns past v_rank may never have been written (a kernel's tiles narrower than ACC): not read.
            acc = tl.load(ACC + stat[:, None] * BLOCK_RV + offs_rv[None, :], mask=g_ok[:, None] & rv_ok[None, :],
                          other=0.0)
            mixed += acc * split_weight[:, None]
        mixed = (mixed / tl.where(g_ok, total, 1.0)[:, None]).to(dtype)
        up = tl.load(UP + kv * stride_uk + offs_dv[None, :] * v_rank + offs_rv[:, None],
                     mask=rv_ok[:, None] & dv_ok[None, :], other=0.0)  # U_v^T [BLOCK_RV, BLOCK_DV]
        out = tl.dot(mixed, up)  # fp32
        if HAS_BIAS:
            out += tl.load(BIAS + kv * v_dim + offs_dv, mask=dv_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + row * stride_ob + kv * stride_ok + offs_g[:, None] * v_dim + offs_dv[None, :], out.to(dtype),
                 mask=g_ok[:, None] & dv_ok[None, :])

    @triton.jit
    def _rounded_level(x, scale, top):
        """round-half-even(x / scale) clamped to [-top, top], as int8: an IEEE division, then (y + 1.5 * 2^23) -
        1.5 * 2^23, which rounds a float32 |y| < 2^22 to the nearest integer, ties to even, as torch.round does."""
        magic: tl.constexpr = 12582912.0
        return tl.minimum(tl.maximum((tl.math.div_rn(x, scale) + magic) - magic, -top), top).to(tl.int8)

    @triton.jit
    def _quantize_into_slot_kernel(
        X, STORE, SCALE, SLOT,  # x [B, H, 1, C] new token; store [B, H, S, C] int8 / [B, H, S, C / 2] uint8;
        stride_xb, stride_xh, stride_sb, stride_sh, stride_ss, stride_cb, stride_cs,  # scale [B, 1, S, 1]
        heads, cols, top, tiny,
        SLOT_PER_ROW: tl.constexpr, PACKED: tl.constexpr, BFLOAT16: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row's new token rounded to `bits` and written into its slot, as modeling_kvforge.quantize_slots and
        two slot writes do it, bit for bit: scale = max|x| over every head's columns / top rounded to x's dtype (at
        least `tiny`), levels = round-half-even(x / scale) in float32 with an IEEE division, int8 values or two
        4-bit ones per byte (the even position in the low nibble). A latent is one head (H = 1)."""
        row = tl.program_id(0)
        slot = tl.load(SLOT + row) if SLOT_PER_ROW else tl.load(SLOT)
        dtype = X.dtype.element_ty
        head = tl.arange(0, BLOCK_H)[:, None]
        offs = tl.arange(0, BLOCK)[None, :]
        x_row = X + row * stride_xb + head * stride_xh
        if PACKED:  # byte j holds values 2j and 2j + 1
            ok = (head < heads) & (offs < cols // 2)
            even = tl.load(x_row + 2 * offs, mask=ok, other=0.0).to(tl.float32)
            odd = tl.load(x_row + 2 * offs + 1, mask=ok, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.max(tl.abs(even), axis=1), axis=0),
                              tl.max(tl.max(tl.abs(odd), axis=1), axis=0))
        else:
            ok = (head < heads) & (offs < cols)
            even = tl.load(x_row + offs, mask=ok, other=0.0).to(tl.float32)
            amax = tl.max(tl.max(tl.abs(even), axis=1), axis=0)
        scale = tl.math.div_rn(amax, top)
        if BFLOAT16:  # to the nearest bfloat16, ties to even, as torch rounds (Triton's interpreter truncates .to())
            bits = scale.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            scale = bits.to(tl.float32, bitcast=True)
        else:
            scale = scale.to(dtype).to(tl.float32)
        scale = tl.maximum(scale, tiny)
        level = _rounded_level(even, scale, top)
        if PACKED:
            level = ((level & 0xF) | (_rounded_level(odd, scale, top) << 4)).to(tl.uint8, bitcast=True)
        tl.store(STORE + row * stride_sb + head * stride_sh + slot * stride_ss + offs, level, mask=ok)
        tl.store(SCALE + row * stride_cb + slot * stride_cs, scale.to(dtype))


def quantize_into_slot(value: torch.Tensor, stored: torch.Tensor, scales: torch.Tensor, slot: torch.Tensor,
                       bits: int) -> None:
    """A static decode step's write of a low-bit cache entry in one launch: a latent's new token value [B, 1, R]
    rounded to `bits` into stored[b, slot[b]] (int8 [B, S, R], or uint8 [B, S, R / 2] for 4 bits) and its scale into
    scales[b, slot[b], 0] ([B, S, 1], value's dtype); or a head-major one's (dense keys and values, rotary keys),
    value [B, H, 1, D] into stored[b, :, slot[b]] ([B, H, S, D or D / 2]) with one scale over all its heads into
    scales[b, 0, slot[b], 0] ([B, 1, S, 1]). slot [B] or [1] (every row's) on the device; the last dim even for 4
    bits. The same bytes as modeling_kvforge.quantize_slots and two slot writes
    (tests/kernels/test_quantize_into_slot.py)."""
    packed = bits == 4
    value = value.contiguous()
    if value.dim() == 3:  # a latent: one head
        heads, cols = 1, value.shape[-1]
        strides = (value.stride(0), 0, stored.stride(0), 0, stored.stride(1), scales.stride(0), scales.stride(1))
    else:
        heads, cols = value.shape[1], value.shape[-1]
        strides = (value.stride(0), value.stride(1), stored.stride(0), stored.stride(1), stored.stride(2),
                   scales.stride(0), scales.stride(2))
    _quantize_into_slot_kernel[(value.shape[0],)](
        value, stored, scales, slot, *strides, heads, cols, float((1 << (bits - 1)) - 1),
        float(torch.finfo(value.dtype).tiny), SLOT_PER_ROW=slot.shape[0] > 1, PACKED=packed,
        BFLOAT16=value.dtype == torch.bfloat16, BLOCK_H=_next_power_of_2(heads, at_least=1),
        BLOCK=_next_power_of_2(cols // 2 if packed else cols, at_least=2),
    )


def rope_table(inv_freq: torch.Tensor, scaling: float, positions: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[P, D] in `dtype` with P >= positions: cos(p * inv_freq) * scaling in the first D/2 columns, sin in the rest,
    the angles computed in float32 as the model's rotary embedding computes them. Kept on the inv_freq tensor (one
    per scaling and dtype, grown by doubling), so a model's layers share one table, and a replaced inv_freq
    (dynamic RoPE types) gets its own. A table outgrown stays allocated (less than the new one, in all): a CUDA
    graph captured with it (a kept static cache's decode step, KVForgeCache.reset) reads it by address."""
    tables = inv_freq.__dict__.setdefault("_kvforge_rope_tables", {})
    key = (scaling, dtype)
    table = tables.get(key)
    if table is None or table.shape[0] < positions:
        if table is not None:
            inv_freq.__dict__.setdefault("_kvforge_outgrown_rope_tables", []).append(table)
        size = max(1024, 1 << (positions - 1).bit_length())
        angles = torch.arange(size, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        table = tables[key] = torch.cat((angles.cos() * scaling, angles.sin() * scaling), dim=1).to(dtype)
    return table


# A 4-bit latent's U_k is held whole (four [half rank, columns] tiles, the size of the two whole tiles of an
# unpacked rank of 2x this): up to 2 x 128 ranks, enough for every K/V width up to 256.
MAX_PACKED_HALF_RANK = 128
# merged_values(fused=True) holds U_v^T for one KV head as one tile [acc width, Dv] (64 KiB in 16 bits at this size);
# wider ones take the merge kernel and a GEMM.
MAX_FUSED_VALUE_TILE = 32768


def _next_power_of_2(n: int, at_least: int = 16) -> int:
    # tl.dot needs every dimension >= 16
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Launch settings latent_decode_attention takes when its caller gives none. Benchmarks set them to compare
# configurations end to end (launch/benchmark_decode.py --latent-kernel); the values are the measured defaults
# (docs/results/decode-h200/README.md, session 14, one H200).
#   kv_per_program: KV heads per program (None: all of them). One per program frees registers (220 -> 160 offline)
#     but rebuilds keys from every latent tile once per head: measured 1.7-2.7x slower than all heads in one.
#   programs_per_sm: the programs the slot splits aim at, per SM. Two fill an SM once at the kernel's occupancy
#     (two programs per SM, benchmarks/kernel_resources.py), but a grid just over one wave (B=32 at 16k: 9 splits,
#     288 programs for 264 places) runs a second, nearly empty wave as long as the first; at eight that tail is a
#     small share: generate() of the aligned 25% and 12.5% models at B=32 x 16k went from 12.0 and 11.0 to 10.3 and
#     9.0 ms per step. The kernel alone (8-bit, ranks 48/96): 0.40-0.48 -> 0.56-0.58 TB/s from 32 x 16k and
#     128 x 4k up, 7% slower at 32 x 4k; 4-bit (96/224): 15% faster at 32 x 16k, 2-11% slower elsewhere. Since
#     session 22 8-bit latents take two in whole waves (whole_waves, below), which has neither tail.
#   prefetch: each iteration issues the next tile's key latents' loads before this tile's dots (a register double
#     buffer), since Triton's software pipelining may not take loads that are dequantized before the dot: without
#     it every tile may wait on its own loads, at two programs per SM. Offline (sm_90, ranks 48/96, 64-slot tiles):
#     int8 220 -> 252 registers, no spill; prefetching the values too spilled 880 bytes. Not yet timed: off.
#   split_columns: a program's key columns (KV heads x D/2, each half) as two power-of-two tiles where one would be
#     padded: SmolLM2's 3 x 32 as 64 + 32 rather than 128, so a quarter less of the key rebuild's products, of the
#     rotation's float32 work and of the score product, for twice the dots (narrower ones). Alone, on the kernel
#     (H200, session 18, B x S from 32 x 4k to 128 x 16k): 3-7% faster for 8-bit ranks 48 / 144 and 4-bit 64 / 128.
#   split_values: the value latent's columns likewise (the aligned 25% model's value ranks of 144-176 as 128 + 16..64
#     rather than 256): less of the value tiles' loads, dequantization and product. Alone 33-54% slower (8-bit).
#   slot_rows: the score and value products with the tile's slots as their rows (scores [BLOCK_S, H], the value
#     accumulators [Rv, H]) rather than the query heads (M = 16 rows for SmolLM2's 9 heads). The rotated keys then
#     enter the score product as its left operand, in the rows their rebuild left them in, where the other way
#     round they were transposed through shared memory every tile ([BLOCK_S, 128] twice); only the probabilities
#     (BLOCK_S x 16) take that trip, and every product has 64 or more rows (Hopper's warpgroup MMA wants 64).
#     Alone 17-31% slower (8-bit), 4-20% slower (4-bit).
#   With all three, 8-bit latents were the fastest of the eight layouts at all six shapes: 10-12% under the old
#     layout (192.5 -> 171.4 us at 32 x 16k, 0.56 -> 0.63 TB/s); generate() of the exported 25% model at B=32 x 16k
#     went from 9.71 to 8.54 ms per step with the compiled step. None (split_values' and slot_rows' default): on for
#     8-bit latents, off for 4-bit and bf16 ones (docs/results/decode-h200/README.md, session 18).
#   word_loads: 8-bit latents read as 32-bit words and made float16 by byte permutes and one subtraction per two
#     values (words_to_halves, exact), the key scales applied to the scores and the value scales to float16 values.
#     Offline (sm_90, ranks 48 / 144, the defaults above): Triton's own int8 conversion puts each byte in its own
#     register (364 byte permutes and 104 int-to-float conversions per tile per warp, 255 registers and an 80-byte
#     spill); word loads make it 1,079 instructions per tile instead of 1,493, 217 registers, no spill. On an H200
#     (session 19, ranks 48 / 144, six shapes from 32 x 4k to 128 x 16k): 5.6-7.4% faster at each (173.2 -> 161.8
#     us at 32 x 16k, 170.3 -> 160.8 at 128 x 4k): the kernel waits more than it issues. On for 8-bit latents.
#     4-bit latents (nibbles_to_halves: eight values per word by three shifts, four lop3 and four float16x2
#     subtractions, exact) were built in session 20 after its GPU time: offline (ranks 64 / 128, 64-slot tiles over
#     4 warps) 1,375 -> 1,202 instructions per tile, 255 -> 248 registers, the 8-byte spill gone; not timed, so None
#     leaves them off for 4-bit (1 turns them on).
#   merged_halves: each column group's U_k halves interleaved, so the keys' rebuild and the score are one product
#     each per group (9 -> 5 waited tensor-core groups per tile offline, 202 registers with word loads). Measured
#     the same or up to 5% slower with or without word loads (session 19): off.
#   half_rope_table, max_registers: occupancy. Two programs fit an SM (with word loads: 217 registers per thread and
#     80 KiB of shared memory, offline). A float16 cos/sin table (values in [-1, 1]: 11 bits, where the reference
#     rotates in bf16's 8) takes it to 72 KiB, and with registers capped at 168 (a 120-byte spill) three programs
#     fit (benchmarks/kernel_resources.py --word-loads 1 --half-rope-table 0 1 --max-registers 0 168). On an H200
#     (session 20, six shapes): the table alone 0-3% faster (within run-to-run spread); the cap gave three programs
#     per SM (Nsight Compute: 17% occupancy, not 12%) but each warp waited longer (9.0 cycles per instruction, not
#     6.8): 4-25% slower at five shapes, 13% faster at 128 x 16k only. Both off.
#   prefetch_slots: each tile's positions, mask bytes and scales loaded one tile ahead (registers carried through
#     the loop), and every load of a tile issued before its first dot. Nsight Compute on the 8-bit kernel (session
#     20, 32 x 16k): the latent tiles already come through Triton's pipeliner (cp.async, num_stages 3), but these
#     small loads did not, and the positions feed the cos/sin gather: 31% of the warps' stall samples waited on
#     them (long scoreboard), at two programs of four warps per SM. Ahead: 20% of samples, 10-12% faster at all
#     six shapes (163.7 -> 144.3 us at 32 x 16k, 162.2 -> 142.9 at 128 x 4k; 0.62-0.80 TB/s). On 4-bit (64 / 128)
#     and bf16 (48 / 144) latents it was 13-16% slower. None: on for 8-bit latents only.
#   fused_values: the splits' merge and the value up-projection in one kernel (merged_values(fused=True)) rather
#     than the merge kernel, then a batched GEMM whose bias is first copied over its output: two kernels fewer per
#     call. H200, session 22, 8-bit ranks 48 / 144 at two programs per SM in whole waves: the same time within 1% at
#     B = 64 and 128, 1-3% slower at B = 32 (40.4 -> 41.7 us at 32 x 4k): off here. The partial-RoPE kernel's
#     default (its call is shorter, and the two launches a larger share of it: 3-9% faster there).
#   whole_waves: the slot splits held within programs_per_sm per SM rather than reaching it (slot_splits): with
#     programs_per_sm what an SM holds at once, a grid of whole waves, never a nearly empty last one.
#     H200, session 22, 8-bit ranks 48 / 144: two programs per SM (what an SM holds) in whole waves against eight
#     rounded up (session 17's default): 3-10% faster at all six shapes from 32 x 4k to 128 x 16k (44.1 -> 40.4 us
#     at 32 x 4k, 142.8 -> 136.5 at 128 x 4k, 561.1 -> 504.7 at 128 x 16k; 0.67-0.85 TB/s). Two rounded up was
#     the slowest (up to 1.5x: a second wave nearly empty), and whole waves at eight gain only at 128 x 16k (8%).
#     None (programs_per_sm's and whole_waves' default): two per SM in whole waves for 8-bit latents; eight,
#     rounded up, for 4-bit and bf16 ones (not timed with whole waves).
LAUNCH_DEFAULTS = dict(kv_per_program=None, programs_per_sm=None, prefetch=0, split_columns=1, split_values=None,
                       slot_rows=None, word_loads=None, merged_halves=0, half_rope_table=0, max_registers=None,
                       prefetch_slots=None, whole_waves=None, fused_values=0)


def tile_widths(width: int, split: bool, multiple: int = 1) -> tuple[int, int]:
    """Power-of-two tile widths covering `width` columns: one tile, or (split) the largest power of two <= width
    and a second for the rest where the two together are narrower than the one (3 KV heads x 32 key columns:
    64 + 32 against 128; a value rank of 144: 128 + 16 against 256). Both stay multiples of `multiple` (a KV head's
    D/2 columns never straddle two tiles) and at least 16 wide (tl.dot's least); 0: no second tile."""
    whole = _next_power_of_2(width)
    if not split or width < 16:
        return whole, 0
    first = 1 << (width.bit_length() - 1)
    second = _next_power_of_2(width - first) if width > first else 0
    if second == 0 or first + second >= whole or first % multiple or second % multiple:
        return whole, 0
    return first, second


def slot_splits(programs: int, slots: int, block_s: int, device: torch.device, programs_per_sm: int,
                whole_waves: bool = False) -> int:
    """Splits of the slot axis (flash-decoding) so that programs x splits reach programs_per_sm per SM (whole_waves:
    stay within it, so that a grid of one wave when programs_per_sm is what an SM holds at once never spills a
    second, nearly empty one), never a split shorter than four tiles, at most 128 (the merge reads every split's
    partial result). Both decode kernels take theirs from here."""
    if device.type == "cuda":
        target = programs_per_sm * _multiprocessors(device)
    else:
        target = 1  # the interpreter runs programs one after another
    wanted = target // programs if whole_waves else -(-target // programs)
    return max(1, min(wanted, -(-slots // (4 * block_s)), 128))


def latent_decode_attention(query, k_latent, v_latent, k_weight, k_bias, v_weight, v_bias, positions, valid,
                            inv_freq, rope_scaling: float, scaling: float, *, max_position: int | None = None,
                            block_s: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, chunk_rk: int | None = None,
                            kv_per_program: int | None = None, programs_per_sm: int | None = None,
                            prefetch: int | None = None, split_columns: int | None = None,
                            split_values: int | None = None, slot_rows: int | None = None,
                            word_loads: int | None = None, merged_halves: int | None = None,
                            half_rope_table: int | None = None, max_registers: int | None = None,
                            prefetch_slots: int | None = None, whole_waves: int | None = None,
                            fused_values: int | None = None) -> torch.Tensor:
    """One decode step of attention over a pre-RoPE latent cache.

    query [B, K, G, D] (rotated); k_latent [B, S, Rk], v_latent [B, S, Rv]; k_weight [K * D, Rk] and
    v_weight [K * Dv, Rv] (the up-projections' nn.Linear weights), biases [K * D] / [K * Dv] or None;
    positions [B, S] (RoPE positions of the slots, >= 0); valid [B, S] bool (which slots this query may see;
    at least one per row); inv_freq [D/2] and rope_scaling as the model's rotary embedding has them;
    max_position: the largest value in positions if known (else read from the device: one synchronization).
    A low-bit cache: int8 k_latent / v_latent (8 bits), or uint8 [B, S, Rk / 2] / [B, S, Rv / 2] holding two 4-bit
    values per byte (modeling_kvforge.quantize_slots), with their scales k_scale, v_scale [B, S, 1] in query.dtype
    (the kernel reads the bytes and dequantizes them in registers).
    kv_per_program: KV heads one program serves (default: all of them, the measured configuration of
    benchmarks/NOTES.md). Fewer (1: a program per KV head) leave each program 1/K of the key columns and query rows,
    so far fewer registers (offline ptxas for sm_90: see benchmarks/kernel_resources.py), at the price of reading
    each latent tile once per program from L2 and K x the latent PV product. programs_per_sm: what the slot splits
    aim at (num_splits overrides it). prefetch (1: on): the next tile's loads issued before this tile's dots, where
    U_k is held whole (a 4-bit cache, or key ranks up to 128). split_columns (1: on): a program's key columns as
    two power-of-two tiles where one would be padded (tile_widths), where U_k is held whole; split_values: the
    value latent's columns likewise; slot_rows (1: on): the tile's slots as the rows of the score and value
    products, so the rotated keys feed the score product from the registers their own product left them in;
    word_loads (1: on): 8- or 4-bit latents read as 32-bit words and made float16 in registers, where U_k is held
    whole and stored columns and strides are multiples of 4; merged_halves (1: on): with slot rows, where U_k is
    held whole and the cache is not 4-bit, one key product and one score product per column group; half_rope_table
    (1: on): the cos/sin table in float16; max_registers: a cap on registers per thread (ptxas spills past it);
    prefetch_slots (1: on): each tile's positions, mask bytes and scales loaded one tile ahead; whole_waves (1: on):
    the slot splits held within programs_per_sm per SM; fused_values (1: on): the splits' merge and U_v in one
    kernel. All default to LAUNCH_DEFAULTS.
    Returns out [B, K, G, Dv] in query.dtype.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use the PyTorch path (pre_rope_latent_attention)")
    batch, kv_heads, group, dim = query.shape
    heads = kv_heads * group
    packed = k_latent.dtype == torch.uint8  # 4 bits, two per byte
    int8 = k_latent.dtype == torch.int8

    def setting(name: str, given):
        """A launch setting: the caller's, else LAUNCH_DEFAULTS'; None there means by cache (LAUNCH_DEFAULTS says
        why): on for 8-bit latents, off for 4-bit and bf16 ones."""
        value = LAUNCH_DEFAULTS[name] if given is None else given
        return int8 if value is None else value
    slots, k_rank = k_latent.shape[1], k_latent.shape[2] * (2 if packed else 1)
    v_rank = v_latent.shape[2] * (2 if packed else 1)
    if packed and k_rank > 2 * MAX_PACKED_HALF_RANK:
        raise ValueError(f"a 4-bit key latent of rank {k_rank} is above the kernel's {2 * MAX_PACKED_HALF_RANK} "
                         "(its U_k tiles are held whole)")
    if k_latent.stride(-1) != 1 or v_latent.stride(-1) != 1:
        k_latent, v_latent = k_latent.contiguous(), v_latent.contiguous()
    query = query.reshape(batch, heads, dim).contiguous()
    k_weight = k_weight.contiguous()
    positions = positions.contiguous()
    valid = valid.contiguous().view(torch.uint8)  # bytes, not Triton's i1 (whose loads misread a bool mask on GPU)
    if max_position is None:
        max_position = int(positions.max())
    half_rope_table = setting("half_rope_table", half_rope_table)
    table = rope_table(inv_freq, float(rope_scaling), max_position + 1,
                       torch.float16 if half_rope_table else torch.float32)

    # Measured best for bf16/fp16 (benchmarks/NOTES.md); fp32 tiles take twice the shared memory, so less. A 4-bit
    # cache unpacks each tile's nibbles before its dots, and what suits it depends on the ranks (H200,
    # docs/results/decode-h200/README.md): at key ranks of 96 (values 224) 128-slot tiles over 8 warps were the
    # fastest of 36 settings at every shape, 21-26% under 64-slot tiles over 4 warps (session 15, the kernel alone);
    # at the 12.5% recipe's key ranks of 32-64 (values 96-160) the same change made generate() 16-25% slower
    # (session 16: 8.86 -> 11.07 ms per step at B=32 x 16k, 9.39 -> 10.89 at B=128 x 4k). So the wide tiles only
    # from key rank 96 up; 8-bit latents were best at 64 over 4 at every rank measured.
    wide = query.element_size() > 2
    wide_tiles = packed and not wide and k_rank >= 96
    block_s = block_s or (32 if wide else 128 if wide_tiles else 64)
    num_warps = num_warps or (8 if wide_tiles else 4)
    num_stages = num_stages or (2 if wide else 3)
    kv_per_program = min(kv_per_program or LAUNCH_DEFAULTS["kv_per_program"] or kv_heads, kv_heads)
    head_programs = -(-kv_heads // kv_per_program)
    block_h = _next_power_of_2(kv_per_program * group)
    stat_h = _next_power_of_2(heads)
    # Tiles cover the stored columns: half the ranks when packed.
    block_rk, block_rv = _next_power_of_2(k_latent.shape[2]), _next_power_of_2(v_latent.shape[2])
    # Key ranks up to 128 keep U_k's two tiles for the whole program (the measured configurations); larger ones
    # (the 50% model's 8-bit latents: up to 192) read it in chunks of 64 rows per tile. chunk_rk: tests force it.
    chunk_rk = block_rk if packed else chunk_rk or (block_rk if block_rk <= 128 else 64)
    prefetch = bool(setting("prefetch", prefetch)) and chunk_rk == block_rk  # the chunked path loads U_k per chunk
    split_columns = setting("split_columns", split_columns)
    split_values = setting("split_values", split_values)
    slot_rows = setting("slot_rows", slot_rows)
    prefetch_slots = setting("prefetch_slots", prefetch_slots)
    word_loads = setting("word_loads", word_loads)
    merged_halves = setting("merged_halves", merged_halves)
    whole = chunk_rk == block_rk  # U_k held for the whole program
    # Words of 4 bytes: every row of both latents must start on a 4-byte boundary and hold whole words (4-bit: ranks
    # multiples of 8). 16-bit queries only: float16 keys and values would cost a float32 model its precision.
    word_loads = bool(word_loads) and (int8 or packed) and whole and not prefetch and not wide and all(
        n % 4 == 0 for n in (k_latent.shape[2], v_latent.shape[2], k_latent.stride(0), k_latent.stride(1),
                             v_latent.stride(0), v_latent.stride(1), k_latent.data_ptr(), v_latent.data_ptr()))
    merged_halves = bool(merged_halves) and bool(slot_rows) and whole and not packed
    block_c, block_c2 = tile_widths(kv_per_program * (dim // 2), bool(split_columns) and whole, multiple=dim // 2)
    block_rv, block_rv2 = tile_widths(v_latent.shape[2], bool(split_values))
    # None in LAUNCH_DEFAULTS: by cache, two for 8-bit latents and eight for the others (LAUNCH_DEFAULTS says why)
    programs_per_sm = programs_per_sm or LAUNCH_DEFAULTS["programs_per_sm"] or (2 if int8 else 8)
    splits = num_splits or slot_splits(batch * head_programs, slots, block_s, query.device, programs_per_sm,
                                       bool(setting("whole_waves", whole_waves)))
    per_split = -(-slots // splits)
    per_split = -(-per_split // block_s) * block_s  # whole tiles, so only the last split has a ragged end
    splits = -(-slots // per_split)

    # Ranks in order (the packed even / odd ones interleaved), as wide as merge_splits needs: a power of two.
    acc_width = _next_power_of_2(v_latent.shape[2]) * (2 if packed else 1)
    acc = torch.empty(batch, splits, stat_h, acc_width, device=query.device, dtype=torch.float32)
    stats_max = torch.empty(batch, splits, stat_h, device=query.device, dtype=torch.float32)
    stats_sum = torch.empty_like(stats_max)
    has_scales = k_scale is not None
    k_scale = k_scale if has_scales else k_weight  # unread placeholders without scales
    v_scale = v_scale if has_scales else k_weight
    _latent_decode_kernel[(splits, batch, head_programs)](
        query, k_latent, v_latent, k_weight, k_bias if k_bias is not None else k_weight, positions, valid, table,
        k_scale, v_scale, acc, stats_max, stats_sum,
        query.stride(0), k_latent.stride(0), k_latent.stride(1), v_latent.stride(0), v_latent.stride(1),
        positions.stride(0), valid.stride(0),
        k_scale.stride(0) if has_scales else 0, k_scale.stride(1) if has_scales else 0,
        v_scale.stride(0) if has_scales else 0, v_scale.stride(1) if has_scales else 0,
        slots, heads, group, kv_heads, k_rank, v_rank, per_split, splits, float(scaling),
        HALF=dim // 2, BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_C2=block_c2, BLOCK_S=block_s, BLOCK_RK=block_rk,
        BLOCK_RV=block_rv, BLOCK_RV2=block_rv2, ACC_WIDTH=acc_width, SLOT_ROWS=bool(slot_rows),
        HAS_K_BIAS=k_bias is not None, HAS_SCALES=has_scales, CHUNK_RK=chunk_rk, PACKED=packed,
        KV_PER_PROGRAM=kv_per_program, STAT_H=stat_h, PREFETCH=prefetch, WORD_LOADS=word_loads,
        MERGED_HALVES=merged_halves, PREFETCH_SLOTS=bool(prefetch_slots), num_warps=num_warps, num_stages=num_stages,
        # Triton's own option: None leaves the allocation to ptxas
        maxnreg=max_registers or LAUNCH_DEFAULTS["max_registers"],
    )
    return merged_values(acc, stats_max, stats_sum, v_weight, v_bias, kv_heads, group, v_rank, query.dtype,
                         fused=bool(setting("fused_values", fused_values)))


def merge_splits(acc, stats_max, stats_sum, out: torch.Tensor, heads: int, group: int) -> None:
    """Flash-decoding's second stage for a decode kernel's partial results: acc [R, splits, H', W] (H' >= heads,
    W >= out's last dim), max / sum [R, splits, H'], merged per row and head into out [heads / group, R, group, Wo]
    (KV head first; a kernel whose rows are (row, KV head) pairs passes group = heads and gets [R, heads, Wo])."""
    rows, splits, padded_heads, width = acc.shape
    _merge_splits_kernel[(heads, rows)](acc, stats_max, stats_sum, out, splits, rows, group, out.shape[-1],
                                        BLOCK_H=padded_heads, BLOCK_RV=width,
                                        BLOCK_SPLITS=_next_power_of_2(splits, at_least=2))


def merged_values(acc, stats_max, stats_sum, v_weight, v_bias, kv_heads: int, group: int, v_rank: int,
                  dtype: torch.dtype, fused: bool = False) -> torch.Tensor:
    """A latent decode kernel's splits merged (acc [B, splits, H', W] with H' >= H heads and W >= v_rank latent
    columns, max / sum [B, splits, H']), then the value up-projection: out [B, K, G, Dv] in `dtype`. Shared by
    this file's kernel and partial_rope_decode.py's: both accumulate p @ latent and apply U_v once per head.
    fused: both in one kernel (_merged_values_kernel), where U_v's rows fit one tile; else the merge kernel and a
    batched GEMM."""
    batch = acc.shape[0]
    v_dim = v_weight.shape[0] // kv_heads
    if fused and acc.shape[-1] * _next_power_of_2(v_dim) <= MAX_FUSED_VALUE_TILE:
        out = torch.empty(batch, kv_heads, group, v_dim, device=acc.device, dtype=dtype)
        up = v_weight.contiguous().view(kv_heads, v_dim, v_rank)
        _merged_values_kernel[(kv_heads, batch)](
            acc, stats_max, stats_sum, up, v_bias if v_bias is not None else up, out,
            acc.shape[1], group, v_rank, v_dim, up.stride(0), out.stride(0), out.stride(1),
            BLOCK_H=acc.shape[2], BLOCK_RV=acc.shape[3], BLOCK_SPLITS=_next_power_of_2(acc.shape[1], at_least=2),
            BLOCK_G=_next_power_of_2(group), BLOCK_DV=_next_power_of_2(v_dim), HAS_BIAS=v_bias is not None)
        return out
    # sum_s p_s c_s per head, KV head first: [K, B * G, Rv]
    mixed = torch.empty(kv_heads, batch * group, v_rank, device=acc.device, dtype=dtype)
    merge_splits(acc, stats_max, stats_sum, mixed, kv_heads * group, group)
    up = v_weight.view(kv_heads, -1, v_rank).transpose(1, 2)  # [K, Rv, Dv]: U_v per KV head, no copy
    # One batched GEMM (the bias added in it): a matmul of [B, K, G, Rv] by [K, Rv, Dv] would first copy the
    # weight B times to broadcast it over the batch.
    out = torch.bmm(mixed, up) if v_bias is None else torch.baddbmm(v_bias.view(kv_heads, 1, -1), mixed, up)
    return out.view(kv_heads, batch, group, -1).transpose(0, 1)  # [B, K, G, Dv]


__all__ = ["available", "latent_decode_attention", "merge_splits", "merged_values", "quantize_into_slot", "rope_table"]
