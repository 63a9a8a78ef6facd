"""Absorbed (MLA-style) decode attention over a partial-RoPE joint-latent cache, in Triton.

The cache holds, per token, one latent c [B, C, R] shared by every head (keys' non-rotary dims and values are
both up-projected from it) and the keys' rotary dims k_rope [B, Kr, C, Dr], already rotated, either one per KV
head (Kr = K, MHA2MLA) or one for all heads (Kr = 1, DeepSeek MLA's shared rotary key). For one decode token
the PyTorch reference (`partial_rope_attention` in modeling_kvforge.py, absorbed form) computes per query head
h of KV head k = h // G:

    q_lat[h] = q_nope[h] @ U_k[k]                        [R], U_k[k] = k_up.weight rows of head k, [Dn, R]
    score[c] = (q_lat[h] . c_c + q_rope[h] . k_rope[h // (H / Kr), c]) * scaling, masked slots excluded
    out[h]   = (sum_c softmax(score)[c] c_c) @ U_v[k]^T + b_v[k]

U_k and U_v are applied outside the kernel (plain GEMMs, as latent_attention.py does: they cost H x R x D per
row, nothing next to a long cache). The kernel is the part that reads the cache:

    program (head block, split, row): BLOCK_H query heads (every head when H x R is small enough, so the latent
    of a slot is read by one program for all heads and KV groups: the latent is the same tensor for every head)
    over one split of the slots (flash-decoding):
        for each tile of BLOCK_S slots:
            lat  = c[tile]                     [BLOCK_S, R], read once, used for the scores AND the values
            rope = k_rope[heads of the block, tile]  [BLOCK_S, heads x Dr], each rope head's Dr dims side by side
            score = q_lat @ lat^T + q_rope_bd @ rope^T   q_rope_bd [BLOCK_H, heads x Dr]: head h holds its rotary
                                                          query in its rope head's columns and zeros elsewhere,
                                                          so one product gives every head's rotary score
                                                          (Kr = 1: one column block, a plain product)
            online softmax; acc += p @ lat     [BLOCK_H, R]
    a second kernel merges the splits (latent_attention's, whose layout this one writes).

Bytes per slot and row: R + Kr x Dr cache elements and one mask byte; that is the floor this kernel aims at
(vLLM's and FlashMLA's MLA decode read the same: the latent and one rope head, the latent doubling as the
value). A head block covering fewer heads than H re-reads the latent per block (from L2 when the blocks of one
split run together: the head block is the fastest grid axis for that reason), but only its own rope heads.

Tile sizes and warps below were first guessed from the tile's register / shared-memory size; on an H200 (session
21, rank 128) 32- or 128-slot tiles and 8 warps were no faster. The launch settings (LAUNCH_DEFAULTS) are measured.
Imports triton inside `try`: without it `available()` says False and the caller keeps PyTorch. This file is copied
flat beside modeling_kvforge.py in an exported directory; it imports only torch, triton and its sibling kernel files.
"""

from __future__ import annotations

import torch

from .latent_attention import available, slot_splits, tile_widths

try:
    import triton
    import triton.language as tl

    # flash-decoding's second stage (same [B, splits, H, R] layout) and the steps the decode kernels share
    from .latent_attention import (int8_rows, int8_to_halves, largest_scale, merged_values, online_softmax_slot_rows,
                                   online_softmax_tile, power_of_two_under, split_slots)
except ImportError:  # CPU-only install: the PyTorch reference serves
    triton = None

# A tile's latent [BLOCK_S, BLOCK_R] and accumulator [BLOCK_H, BLOCK_R] must stay in shared memory / registers;
# past these the kernel would spill, so the dispatch keeps such shapes on the reference.
MAX_RANK = 1024
MAX_ROPE_COLUMNS = 1024  # rope heads of one head block x Dr


def _next_power_of_2(n: int, at_least: int = 16) -> int:
    # tl.dot needs every dimension >= 16
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())


def default_block_h(heads: int, rank: int) -> int:
    """Query heads per program: all of them while the fp32 accumulator [BLOCK_H, BLOCK_R] stays <= 8K elements
    (32 KiB: 64 registers a thread at 4 warps), else blocks of at least 16 (tl.dot's minimum). Untuned."""
    return min(_next_power_of_2(heads), max(16, 8192 // _next_power_of_2(rank)))


def rope_heads_per_block(heads: int, rope_heads: int, block_h: int) -> int:
    """The most rope heads any block of `block_h` consecutive query heads touches (query head h reads rope head
    h // (heads / rope_heads); a block can straddle group boundaries)."""
    group = heads // rope_heads
    return max((min(start + block_h, heads) - 1) // group - start // group + 1 for start in range(0, heads, block_h))


def fits(heads: int, kv_heads: int, rope_heads: int, rank: int, rope_dim: int, block_h: int | None = None) -> bool:
    """The shapes the kernel serves. Head counts, R and Dr need not be powers of two (the kernel pads them:
    R to BLOCK_R, a block's rope columns to BLOCK_C, heads to BLOCK_H, each a power of two >= 16); what it
    refuses: a rope-head count other than 1 or K (the layouts it knows), R past MAX_RANK, and a head block's
    rope columns past MAX_ROPE_COLUMNS (tiles that would no longer fit on chip)."""
    if rope_heads not in (1, kv_heads) or heads % kv_heads or rank < 1 or rope_dim < 1 or rank > MAX_RANK:
        return False
    block_h = block_h or default_block_h(heads, rank)
    return rope_heads_per_block(heads, rope_heads, block_h) * rope_dim <= MAX_ROPE_COLUMNS


if triton is not None:

    @triton.jit
    def _latent_tile(LATENT, row, offs_s, visible, offs_r, r_ok, stride_lb, stride_ls, dtype: tl.constexpr,
                     HALF_PRODUCTS: tl.constexpr):
        """The latent tile of slots offs_s and columns offs_r in the products' dtype. Masked slots and columns are
        never loaded (nor their bytes moved: left padding, a ring's empty slots) and read as zero."""
        lat = tl.load(LATENT + row * stride_lb + offs_s[:, None] * stride_ls + offs_r[None, :],
                      mask=visible[:, None] & r_ok[None, :], other=0)
        # One return (Triton 3.6 refuses returns of different types, even under constexpr branches).
        if HALF_PRODUCTS:  # exact: |v| <= 127 within float16's 11 bits
            lat = int8_to_halves(lat)
        else:
            lat = lat.to(dtype)
        return lat

    @triton.jit
    def _rope_tile(rope_base, offs_s, visible, col_ok, stride_krs, dtype: tl.constexpr, HALF_PRODUCTS: tl.constexpr,
                   INT8_SCORES: tl.constexpr):
        """The rotary keys' tile of slots offs_s in the products' dtype, or as stored (int8) for INT8_SCORES."""
        rope = tl.load(rope_base + offs_s[:, None] * stride_krs, mask=visible[:, None] & col_ok[None, :], other=0)
        if not INT8_SCORES:  # int8 scores take the bytes as loaded
            if HALF_PRODUCTS:
                rope = int8_to_halves(rope)
            else:
                rope = rope.to(dtype)
        return rope

    @triton.jit
    def _partial_rope_decode_kernel(
        Q_LAT, Q_ROPE, LATENT, K_ROPE, VALID, LENGTH,  # inputs
        LATENT_SCALE, ROPE_SCALE,  # an 8-bit cache's scales (HAS_SCALES): [B, C, 1] and [B, 1, C, 1]; else unused
        ACC, MAX, SUM,  # outputs, per split: acc [B, splits, H_pad, ACC_WIDTH], max / sum [B, splits, H_pad]
        stride_qlb, stride_qlk, stride_qlg,  # q_lat [K, B, G, R] (KV head first, as its GEMM leaves it), R contiguous
        stride_qrb, stride_qrh,  # q_rope [B, H, Dr], Dr contiguous
        stride_lb, stride_ls,  # latent [B, C, R], R contiguous
        stride_krb, stride_krh, stride_krs,  # k_rope [B, Kr, C, Dr], Dr contiguous
        stride_valid_b,  # valid [B or 1, C] (uint8), slots contiguous; 0 for one row shared by all
        stride_lsb, stride_lss, stride_rsb, stride_rss,  # the scales' row and slot strides
        slots, heads, group, rank, rope_group, rope_heads, block_rope_heads, padded_heads, slots_per_split, splits,
        scaling, ROPE_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_R2: tl.constexpr,
        ACC_WIDTH: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr, HAS_VALID: tl.constexpr, LENGTH_IN_MEMORY: tl.constexpr, SLOT_ROWS: tl.constexpr,
        PREFETCH_SLOTS: tl.constexpr, PREFETCH_SCALES: tl.constexpr, HAS_SCALES: tl.constexpr,
        HALF_PRODUCTS: tl.constexpr, INT8_SCORES: tl.constexpr,
    ):
        # SLOT_ROWS: every product with the tile's slots as its rows (scores [BLOCK_S, BLOCK_H], the accumulator
        # [BLOCK_R, BLOCK_H]), so each has 64+ rows for Hopper's warpgroup MMA rather than BLOCK_H (16) of them.
        # BLOCK_R2 > 0 (split_columns): the latent's columns as two power-of-two tiles, BLOCK_R then BLOCK_R2 more,
        # where one tile would be padded (a rank of 96 as 64 + 32, not 128): every per-column step of a tile (its
        # conversion, both products, the accumulator's rescaling) on a quarter fewer columns, for twice the dots.
        # HAS_SCALES (an 8-bit cache): the int8 latent and rotary keys enter the products in the queries' dtype
        # (exact: |v| <= 127), and each slot's scales multiply what the products give rather than the tiles: its
        # latent scale its latent score and its weight in the value sum ((s c) q = s (c q)), its rotary scale its
        # rotary score. Each product's 16-bit operand is first scaled by a power of two (power_of_two_under, once
        # per program: the queries by their largest, the value weights p x scale by the split's largest latent
        # scale, read ahead of the tiles at 2 bytes a slot) and what it sums scaled back: in float16 (HALF_PRODUCTS,
        # float16 queries) a bf16 query past 65,504 would overflow, and at 32k slots most weights p x scale would
        # fall among the subnormals (5e-3 relative error in a float64 simulation, against bf16's 1.5e-3).
        # INT8_SCORES (with HALF_PRODUCTS): the rotary score product in int8 x int8 -> int32 on the rotary keys' bytes
        # as loaded (never converted), the rotary query rounded to int8 once by a scale per head (its largest
        # |value| / 127), which with the slot's rotary scale multiplies what the product gives.
        head_block = tl.program_id(0)
        split = tl.program_id(1)
        row = tl.program_id(2).to(tl.int64)  # row * stride_lb passes 2^31 at B=256, C=32k, R=512
        dtype = Q_LAT.dtype.element_ty

        offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)  # rope column c: rope head first_rope_head + c // ROPE_DIM, dim c % ROPE_DIM
        h_ok = offs_h < heads
        r_ok = offs_r < rank
        first_rope_head = (head_block * BLOCK_H) // rope_group
        col_head = first_rope_head + offs_c // ROPE_DIM
        col_dim = offs_c % ROPE_DIM
        # Padding columns, and rope heads of no query head in this block, are never loaded.
        col_ok = (offs_c // ROPE_DIM < block_rope_heads) & (col_head < rope_heads)

        q_lat_rows = (Q_LAT + row * stride_qlb + (offs_h // group)[:, None] * stride_qlk
                      + (offs_h % group)[:, None] * stride_qlg)
        q_lat = tl.load(q_lat_rows + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
        if BLOCK_R2 > 0:
            offs_r2 = BLOCK_R + tl.arange(0, BLOCK_R2)
            r2_ok = offs_r2 < rank
            q_lat2 = tl.load(q_lat_rows + offs_r2[None, :], mask=h_ok[:, None] & r2_ok[None, :], other=0.0)
        # Block-diagonal rotary query [BLOCK_H, BLOCK_C]: head h fills only its rope head's Dr columns.
        own = (col_head[None, :] == (offs_h // rope_group)[:, None]) & h_ok[:, None] & col_ok[None, :]
        q_rope = tl.load(Q_ROPE + row * stride_qrb + offs_h[:, None] * stride_qrh + col_dim[None, :], mask=own,
                         other=0.0)
        rope_base = K_ROPE + row * stride_krb + col_head.to(tl.int64)[None, :] * stride_krh + col_dim[None, :]

        if HALF_PRODUCTS:  # int8 tiles made float16 by int8_to_halves, beside 16-bit queries
            dtype = tl.float16
        if HAS_SCALES:
            largest_lat = tl.max(tl.abs(q_lat.to(tl.float32)))
            if BLOCK_R2 > 0:
                largest_lat = tl.maximum(largest_lat, tl.max(tl.abs(q_lat2.to(tl.float32))))
            lat_query_scale = power_of_two_under(largest_lat)
            rope_query_scale = power_of_two_under(tl.max(tl.abs(q_rope.to(tl.float32))))
            q_lat = (q_lat.to(tl.float32) * lat_query_scale).to(dtype)
            if BLOCK_R2 > 0:
                q_lat2 = (q_lat2.to(tl.float32) * lat_query_scale).to(dtype)
            q_rope = (q_rope.to(tl.float32) * rope_query_scale).to(dtype)
            lat_score_scale, rope_score_scale = 1.0 / lat_query_scale, 1.0 / rope_query_scale  # exact: 2^-k
        if INT8_SCORES:  # the rotary query, as scaled above, in int8 by a step per head
            q_rope, rope_steps = int8_rows(q_rope.to(tl.float32))  # rope_steps [BLOCK_H]
            rope_steps = rope_steps * rope_score_scale  # exact 2^-k undoes the scaling by rope_query_scale
        running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_H], tl.float32)
        if SLOT_ROWS:
            acc = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
            q_lat, q_rope = tl.trans(q_lat), tl.trans(q_rope)
            if BLOCK_R2 > 0:
                acc2 = tl.zeros([BLOCK_R2, BLOCK_H], tl.float32)
                q_lat2 = tl.trans(q_lat2)
        else:
            acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
            if BLOCK_R2 > 0:
                acc2 = tl.zeros([BLOCK_H, BLOCK_R2], tl.float32)

        start, end = split_slots(LENGTH, slots, split, slots_per_split, LENGTH_IN_MEMORY)
        valid_base = VALID + row * stride_valid_b
        if HAS_VALID and PREFETCH_SLOTS:
            ahead = start + tl.arange(0, BLOCK_S)
            next_valid = tl.load(valid_base + ahead, mask=ahead < end, other=0)
        lat_scales = LATENT_SCALE + row * stride_lsb
        rope_scales = ROPE_SCALE + row * stride_rsb
        if HAS_SCALES:
            weight_scale = power_of_two_under(largest_scale(lat_scales, stride_lss, start, end))
            if PREFETCH_SCALES:
                ahead = start + tl.arange(0, BLOCK_S)
                next_lat_scale = tl.load(lat_scales + ahead * stride_lss, mask=ahead < end, other=0.0)
                next_rope_scale = tl.load(rope_scales + ahead * stride_rss, mask=ahead < end, other=0.0)
        for tile in range(start, end, BLOCK_S):
            offs_s = tile + tl.arange(0, BLOCK_S)
            visible = offs_s < end
            if HAS_VALID:
                if PREFETCH_SLOTS:  # this tile's bytes came with the last; the next tile's are asked for now
                    visible = visible & (next_valid != 0)
                    ahead = offs_s + BLOCK_S
                    next_valid = tl.load(valid_base + ahead, mask=ahead < end, other=0)
                else:
                    visible = visible & (tl.load(valid_base + offs_s, mask=visible, other=0) != 0)
            lat = _latent_tile(LATENT, row, offs_s, visible, offs_r, r_ok, stride_lb, stride_ls, dtype, HALF_PRODUCTS)
            if BLOCK_R2 > 0:
                lat2 = _latent_tile(LATENT, row, offs_s, visible, offs_r2, r2_ok, stride_lb, stride_ls, dtype,
                                    HALF_PRODUCTS)
            rope = _rope_tile(rope_base, offs_s, visible, col_ok, stride_krs, dtype, HALF_PRODUCTS, INT8_SCORES)
            if HAS_SCALES:
                if PREFETCH_SCALES:  # loaded with the last tile, masked slots' included: zeroed here (a never
                    # written slot's scale may be anything, and 0 x NaN would reach the value sum)
                    lat_scale = tl.where(visible, next_lat_scale.to(tl.float32), 0.0)
                    rope_scale = tl.where(visible, next_rope_scale.to(tl.float32), 0.0)
                    ahead = offs_s + BLOCK_S
                    next_lat_scale = tl.load(lat_scales + ahead * stride_lss, mask=ahead < end, other=0.0)
                    next_rope_scale = tl.load(rope_scales + ahead * stride_rss, mask=ahead < end, other=0.0)
                else:
                    lat_scale = tl.load(lat_scales + offs_s * stride_lss, mask=visible, other=0.0).to(tl.float32)
                    rope_scale = tl.load(rope_scales + offs_s * stride_rss, mask=visible, other=0.0).to(tl.float32)
            if SLOT_ROWS:
                lat_scores = tl.dot(lat, q_lat)  # [BLOCK_S, BLOCK_H]
                if BLOCK_R2 > 0:
                    lat_scores += tl.dot(lat2, q_lat2)
                if INT8_SCORES:
                    scores = (lat_scores * (lat_scale * lat_score_scale)[:, None]
                              + tl.dot(rope, q_rope, out_dtype=tl.int32).to(tl.float32)
                              * rope_scale[:, None] * rope_steps[None, :])
                elif HAS_SCALES:
                    scores = (lat_scores * (lat_scale * lat_score_scale)[:, None]
                              + tl.dot(rope, q_rope) * (rope_scale * rope_score_scale)[:, None])
                else:
                    scores = lat_scores + tl.dot(rope, q_rope)
                scores = tl.where(visible[:, None], scores * scaling, float("-inf"))
                running_max, alpha, p, running_sum = online_softmax_slot_rows(scores, running_max, running_sum)
                if HAS_SCALES:
                    p = p * (lat_scale * weight_scale)[:, None]  # the running sum keeps the unscaled weights
                p = p.to(dtype)
                acc = acc * alpha[None, :] + tl.dot(tl.trans(lat), p)  # the latent doubles as the value
                if BLOCK_R2 > 0:
                    acc2 = acc2 * alpha[None, :] + tl.dot(tl.trans(lat2), p)
            else:
                lat_scores = tl.dot(q_lat, tl.trans(lat))  # [BLOCK_H, BLOCK_S]
                if BLOCK_R2 > 0:
                    lat_scores += tl.dot(q_lat2, tl.trans(lat2))
                if INT8_SCORES:
                    scores = (lat_scores * (lat_scale * lat_score_scale)[None, :]
                              + tl.dot(q_rope, tl.trans(rope), out_dtype=tl.int32).to(tl.float32)
                              * rope_steps[:, None] * rope_scale[None, :])
                elif HAS_SCALES:
                    scores = (lat_scores * (lat_scale * lat_score_scale)[None, :]
                              + tl.dot(q_rope, tl.trans(rope)) * (rope_scale * rope_score_scale)[None, :])
                else:
                    scores = lat_scores + tl.dot(q_rope, tl.trans(rope))
                scores = tl.where(visible[None, :], scores * scaling, float("-inf"))
                running_max, alpha, p, running_sum = online_softmax_tile(scores, running_max, running_sum)
                if HAS_SCALES:
                    p = p * (lat_scale * weight_scale)[None, :]
                p = p.to(dtype)
                acc = acc * alpha[:, None] + tl.dot(p, lat)  # the latent doubles as the value
                if BLOCK_R2 > 0:
                    acc2 = acc2 * alpha[:, None] + tl.dot(p, lat2)

        if HAS_SCALES:
            acc = acc * (1.0 / weight_scale)
            if BLOCK_R2 > 0:
                acc2 = acc2 * (1.0 / weight_scale)
        stat = (row * splits + split) * padded_heads + offs_h
        # Columns past BLOCK_R + BLOCK_R2 (< ACC_WIDTH) are never written; the merge reads only the first `rank`.
        if SLOT_ROWS:
            tl.store(ACC + stat[None, :] * ACC_WIDTH + offs_r[:, None], acc)
            if BLOCK_R2 > 0:
                tl.store(ACC + stat[None, :] * ACC_WIDTH + offs_r2[:, None], acc2)
        else:
            tl.store(ACC + stat[:, None] * ACC_WIDTH + offs_r[None, :], acc)
            if BLOCK_R2 > 0:
                tl.store(ACC + stat[:, None] * ACC_WIDTH + offs_r2[None, :], acc2)
        tl.store(MAX + stat, running_max)
        tl.store(SUM + stat, running_sum)


# Launch settings the kernel takes when its caller gives none; benchmarks set them (launch/benchmark_decode.py).
#   slot_rows: the score and value products with the tile's slots as their rows (latent_attention.py's
#     LAUNCH_DEFAULTS says why). H200, session 18: 7-21% faster at every shape from 32 x 4k to 128 x 16k, rank 128 and
#     Kr = 3 or 1 (2.31 -> 2.47 and 2.08 -> 2.52 TB/s at 128 x 16k, 58-59% of the copy bandwidth).
#   prefetch_slots: 1: the next tile's mask bytes loaded a tile ahead, so the tile's latent and rotary loads, which
#     the mask gates, do not wait on them first (the latent kernel's prefetch_slots). H200, session 21, rank 128 + 16
#     rotary dims, B x S from 64 x 4k to 128 x 16k, Kr = 3 and 1: 3-17% faster at all eight shapes, at 2 and at 8
#     programs per SM.
#   programs_per_sm, whole_waves: the slot splits aim at programs_per_sm per SM, and with whole_waves stay within
#     it (latent_attention.slot_splits). An SM holds four of this kernel's programs at once (rank 128: 107
#     registers a thread, 57 KiB of shared memory; Nsight Compute), so four, whole, is one full wave: B=128 takes 4
#     splits, 512 programs for 528 places, where 2 per SM left a quarter of them empty and 8, rounded up, made 9
#     splits, 1,152 programs, whose third wave ran nearly empty.
#     Session 21, with prefetch_slots: at least as fast as 8 per SM rounded up at all eight shapes (0.94x its time,
#     geometric mean; 128 x 16k Kr = 3 260 -> 220 us, 79% of the copy bandwidth; 64 x 4k 54 -> 50 us, 43%, where
#     the call's other kernels take a third of its time). Three stages, 32- or 128-slot tiles, 8 warps: no better.
#   fused_values: the splits' merge and U_v in one kernel (latent_attention.py's LAUNCH_DEFAULTS says more). H200,
#     session 22, rank 128 + 16 rotary dims: faster at all eight shapes, most at 4k where the call is short (64 x 4k
#     Kr = 3 45.6 -> 42.3 us, 51% of the copy bandwidth; 128 x 4k 70.5 -> 64.5, 67%; 128 x 16k 210.7 -> 205.3, 85%).
#   An 8-bit cache (HAS_SCALES), session 22, rank 96 + 3 x 32 rotary dims (partial-rope-25-int8-long's layout): these
#     settings, 16-21% of the copy bandwidth (128 x 16k, Kr = 3: 461.6 us; 128 x 4k 129.9 us). Tried there and
#     removed: int8 tiles read as words and made float16 by byte permutes (as latent_attention's word_loads), 762
#     instructions per tile against 1,795 offline, yet 1.9-2.2x slower at Kr = 3 and within 10% at Kr = 1; three
#     programs per SM, faster at Kr = 1 only. `docs/results/decode-h200/README.md`, session 22.
#   half_products: an 8-bit cache beside 16-bit queries: 1: every product in float16, the int8 tiles made float16 by
#     byte permutes where they were loaded (latent_attention.int8_to_halves: three integer instructions and two
#     float16x2 subtractions per four values, exact), the queries converted once; 0: the tiles converted to the
#     queries' dtype by Triton, which converts in the products' operand layout (each byte a permute) and the latent
#     twice (once per product). Offline (sm_90, the layout below): 1,367 -> 667 loop instructions per tile, 194 ->
#     167 registers, so three programs fit an SM rather than two. H200, session 23, at three programs per SM
#     against session 22's settings: 1.2-1.3x faster at all eight shapes from 64 x 4k to 128 x 16k (128 x 16k
#     Kr = 3 454.2 -> 364.6 us, 26% of the copy bandwidth; Kr = 1 379.8 -> 296.9; 128 x 4k Kr = 3 127.3 -> 105.0).
#     Three pipeline stages: no faster; 128-slot tiles over 8 warps: 1.1-1.5x slower. The same permutes with the
#     heads as the rows, padded to 64 (one conversion into shared memory, read there by both products): 2x slower.
#     What still separates it from the bf16 kernel's 85%: each converted tile goes through shared memory and back
#     into registers for its two products (the bf16 tiles feed the tensor cores from shared memory as loaded).
#     Its float16 operands scaled by powers of two (the kernel's note on HAS_SCALES): 696 loop instructions offline,
#     168 registers; the same speed on the H200 (128 x 16k Kr = 3: 361.8 us; float64 error unchanged, 2.2e-3).
#   slot_rows None: the heads as the rows (16, mma.sync) for an 8-bit cache with half_products, the slots otherwise.
#     H200, session 24, the layout above at three programs per SM: 10-20% faster than slot rows at all eight shapes
#     (128 x 16k Kr = 3 360.9 -> 307.6 us, 31% of the copy bandwidth; Kr = 1 290.7 -> 233.6; 64 x 4k Kr = 3
#     60.9 -> 55.2); offline the same 696 loop instructions, 148 registers against 168. 32- or 128-slot tiles, 8
#     warps: no faster at Kr = 3. Each tile loaded and converted an iteration ahead and carried into the next
#     (so that Triton feeds both products from shared memory): with slot rows an illegal memory access on the H200
#     under Triton 3.6 (bf16 and 8-bit alike; correct in the interpreter), with head rows no faster. Removed.
#   programs_per_sm None: four (what an SM holds), three for an 8-bit cache with half_products without a register cap.
#   int8_scores: with half_products, 1: the rotary score product in int8 on the rotary keys' bytes (never converted),
#     the rotary query rounded to int8 by a scale per head; 0: in float16. The latent is converted either way (it
#     doubles as the value). H200, session 26, the layout above at its defaults: 13-17% faster at Kr = 3 at all four
#     shapes from 64 x 4k to 128 x 16k (128 x 16k 308.9 -> 258.0 us, 38% of the copy bandwidth; 128 x 4k
#     91.9 -> 78.8; 64 x 4k 54.7 -> 47.6), the same at Kr = 1 (0-2% faster: one rotary head is a small product).
#   split_columns: 1: the latent's columns as two power-of-two tiles where one would be padded (latent_attention's
#     tile_widths: a rank of 96 as 64 + 32, not 128), so that a tile's conversion, both products and the
#     accumulator's rescaling run on a quarter fewer columns, for twice the dots; 0: one tile. Offline (sm_90, the
#     layout above with int8 rotary scores, head rows): 575 -> 585 loop instructions (fewer conversions and MMAs,
#     more address and mask work), 40 -> 33 KiB of shared memory. H200, session 26: faster at all eight shapes from
#     64 x 4k to 128 x 16k, 6-10% at Kr = 3 (128 x 16k 260.5 -> 234.5 us, 41% of the copy bandwidth; 128 x 4k
#     80.3 -> 73.6) and 11-16% at Kr = 1 (128 x 16k 234.3 -> 201.8). None: on for an 8-bit cache with half_products
#     (what was timed), off otherwise (a bf16 latent's split is untimed per kernel; session 26's generate() rows of
#     the bf16 partial-rope-25, whose rank 48 split as 32 + 16 while this was on for every cache, took 4.10 / 4.14
#     ms against session 21's 3.80 / 3.88 without it).
#   prefetch_scales: an 8-bit cache's two scales per slot loaded a tile ahead, as the mask bytes (prefetch_slots),
#     rather than with the tile, where each warp waited on them before its scores (Nsight Compute, session 26, 128 x
#     4k: 28% of the warps' stall samples on long-scoreboard loads, a fifth of all at the tile's first use of its
#     data; ten 2-byte scale loads a warp a tile). H200, session 26 (call 3), with the cap below: 1-9% faster at
#     Kr = 1 (128 x 16k 189.4 -> 173.1 us; 64 x 16k 104.2 -> 95.7), 0.3-1.4% slower at Kr = 3. None: on for one
#     rotary key shared by all heads.
#   max_registers: a cap on registers per thread (ptxas spills past it), for more programs per SM. The same profile:
#     one wave of three programs per SM (160 registers), 2.9 warps per scheduler, none eligible 61% of cycles.
#     Offline (sm_90, the layout above): 128 registers fit four programs an SM without a spill, 585 -> 613 loop
#     instructions. H200, session 26 (call 3), with programs_per_sm 4: 6-10% faster at Kr = 3 at all four shapes
#     (128 x 16k 234.3 -> 211.3 us, 46% of the copy bandwidth; 128 x 4k 73.9 -> 66.8; 64 x 4k 45.5 -> 42.8), 3-6%
#     at Kr = 1; the cap alone (three programs) 2-10% slower, four programs without it (a second wave) 1.3-1.4x
#     slower at Kr = 3. None: 128 for an 8-bit cache with half_products whose latent and rotary tiles are at most 128
#     columns wide (where it was timed; wider ones spill under it), no cap otherwise.
LAUNCH_DEFAULTS = dict(slot_rows=None, programs_per_sm=None, prefetch_slots=1, whole_waves=1, fused_values=1,
                       half_products=1, int8_scores=1, split_columns=None, prefetch_scales=None, max_registers=None)


def partial_rope_decode_attention(query_rope, query_nope, k_rope, kv_latent, k_weight, v_weight, v_bias,
                                  scaling: float, *, valid=None, length=None, block_s: int | None = None,
                                  block_h: int | None = None, splits: int | None = None,
                                  num_warps: int | None = None, num_stages: int | None = None,
                                  slot_rows: int | None = None, programs_per_sm: int | None = None,
                                  prefetch_slots: int | None = None, whole_waves: int | None = None,
                                  fused_values: int | None = None, half_products: int | None = None,
                                  int8_scores: int | None = None, split_columns: int | None = None,
                                  prefetch_scales: int | None = None, max_registers: int | None = None,
                                  k_rope_scale: torch.Tensor | None = None,
                                  kv_latent_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention over a partial-RoPE joint-latent cache.

    Args:
        query_rope: [B, K, G, Dr], rotated; query_nope: [B, K, G, Dn] (Dn may be 0: every dim rotary).
        k_rope: [B, Kr, C, Dr] rotated keys' rotary dims, Kr = K (one per KV head) or 1 (shared by all heads);
            Dr contiguous (a slice of a larger buffer is fine).
        kv_latent: [B, C, R], R contiguous.
        k_rope_scale, kv_latent_scale: an 8-bit cache (cache_bits: 8): k_rope and kv_latent are then int8 and these
            their scales, [B, 1, C, 1] and [B, C, 1] in the queries' dtype (modeling_kvforge.quantize_slots: one per
            slot over every head's dims); the kernel reads the int8 values and never makes a dequantized copy.
        k_weight: [K * Dn, R] (k_up.weight; k_up's bias, if any, is left out: q_nope . b is the same for every
            slot, so softmax ignores it, as the reference's absorbed form does).
        v_weight: [K * Dv, R], v_bias: [K * Dv] or None (v_up's).
        valid: optional [B or 1, C] bool, the slots each row may attend to (left padding, a window's ring);
            every row keeps at least one (below `length`).
        length: optional 1-element integer device tensor, 1 <= length <= C: slots past it are never read, so one
            CUDA graph serves every position.
        block_s, block_h, splits, num_warps, num_stages: tiling (defaults: see the module doc).
        slot_rows, programs_per_sm, prefetch_slots, whole_waves, fused_values, half_products, int8_scores,
        split_columns, prefetch_scales, max_registers:
            launch settings (LAUNCH_DEFAULTS says what each does and holds the ones not given).
    Returns [B, K, G, Dv] in query_rope's dtype.
    Raises ValueError on shapes `fits` refuses or that disagree with one another.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use the PyTorch path (partial_rope_attention)")
    batch, kv_heads, group, rope_dim = query_rope.shape
    heads = kv_heads * group
    rope_heads, slots = k_rope.shape[1], k_rope.shape[2]
    rank = kv_latent.shape[-1]
    nope_dim = query_nope.shape[-1]
    if (query_nope.shape[:3] != query_rope.shape[:3] or k_rope.shape[0] != batch or k_rope.shape[-1] != rope_dim
            or kv_latent.shape[:2] != (batch, slots) or k_weight.shape != (kv_heads * nope_dim, rank)
            or v_weight.shape[-1] != rank or v_weight.shape[0] % kv_heads):
        raise ValueError(
            f"query_rope {tuple(query_rope.shape)}, query_nope {tuple(query_nope.shape)}, k_rope "
            f"{tuple(k_rope.shape)}, kv_latent {tuple(kv_latent.shape)}, k_weight {tuple(k_weight.shape)} and "
            f"v_weight {tuple(v_weight.shape)} must be [B, K, G, Dr], [B, K, G, Dn], [B, 1 or K, C, Dr], "
            "[B, C, R], [K * Dn, R] and [K * Dv, R]")
    block_h = block_h or default_block_h(heads, rank)
    if not fits(heads, kv_heads, rope_heads, rank, rope_dim, block_h):
        raise ValueError(f"k_rope with {rope_heads} heads (1 or K = {kv_heads}), rank {rank} (at most {MAX_RANK}) "
                         f"and Dr {rope_dim} in blocks of {block_h} heads: not a shape the kernel serves; use "
                         "partial_rope_attention")
    has_scales = k_rope_scale is not None or kv_latent_scale is not None
    if has_scales and not (
            k_rope_scale is not None and kv_latent_scale is not None
            and k_rope.dtype == kv_latent.dtype == torch.int8
            and k_rope_scale.dtype == kv_latent_scale.dtype == query_rope.dtype
            and k_rope_scale.shape == (batch, 1, slots, 1) and kv_latent_scale.shape == (batch, slots, 1)):
        raise ValueError(
            "an 8-bit cache takes int8 k_rope and kv_latent with both scales, [B, 1, C, 1] and [B, C, 1] in the "
            f"queries' dtype {query_rope.dtype}; got k_rope {k_rope.dtype}, kv_latent {kv_latent.dtype}, scales "
            f"{None if k_rope_scale is None else (k_rope_scale.dtype, tuple(k_rope_scale.shape))} and "
            f"{None if kv_latent_scale is None else (kv_latent_scale.dtype, tuple(kv_latent_scale.shape))}")
    if kv_latent.stride(-1) != 1:
        kv_latent = kv_latent.contiguous()
    if k_rope.stride(-1) != 1:
        k_rope = k_rope.contiguous()

    # U_k folded into the query: one batched GEMM per KV head, [K, B x G, Dn] x [K, Dn, R], in the query's dtype as
    # the reference does it. (torch.matmul of [B, K, G, Dn] by [K, Dn, R] would first copy the weight B times to
    # broadcast it over the batch: at B=64 a 5.5 MB copy, 2.8 us of a 50 us call.) The kernel reads it [K, B, G, R].
    q_nope = query_nope.transpose(0, 1).reshape(kv_heads, batch * group, nope_dim)
    q_lat = torch.bmm(q_nope, k_weight.view(kv_heads, nope_dim, rank)).view(kv_heads, batch, group, rank)
    q_rope = query_rope.reshape(batch, heads, rope_dim)
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    if valid is not None:
        if valid.shape[-1] != slots or valid.shape[0] not in (1, batch):
            raise ValueError(f"valid {tuple(valid.shape)} must be [B or 1, C] = [{batch} or 1, {slots}]")
        # bytes, not Triton's i1 (whose loads misread a bool mask on GPU); a bool view costs no copy
        valid = valid.contiguous()
        valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)

    acc_width = _next_power_of_2(rank)
    # The latent tile [BLOCK_S, acc_width] held at most ~32 KiB per pipeline stage (rank 128: 64 slots, the
    # fastest of 32, 64 and 128 on an H200).
    block_s = block_s or max(16, min(64, 32768 // (acc_width * kv_latent.element_size())))
    block_rope_heads = rope_heads_per_block(heads, rope_heads, block_h)
    block_c = _next_power_of_2(block_rope_heads * rope_dim)
    head_blocks = -(-heads // block_h)
    padded_heads = head_blocks * block_h
    settings = {name: LAUNCH_DEFAULTS[name] if given is None else given for name, given in
                (("slot_rows", slot_rows), ("programs_per_sm", programs_per_sm), ("prefetch_slots", prefetch_slots),
                 ("whole_waves", whole_waves), ("fused_values", fused_values), ("half_products", half_products),
                 ("int8_scores", int8_scores), ("split_columns", split_columns),
                 ("prefetch_scales", prefetch_scales), ("max_registers", max_registers))}
    half_products = has_scales and query_rope.element_size() == 2 and bool(settings["half_products"])
    split_columns = half_products if settings["split_columns"] is None else bool(settings["split_columns"])
    block_r, block_r2 = tile_widths(rank, split_columns)
    # The cap where it was timed: tiles of at most 128 latent and 128 rotary columns (rank 96 beside 3 x 32). Wider
    # tiles spill under it (benchmarks/partial_kernel_resources.py --cap-sweep, sm_90: rank 192 beside 3 x 32, 72
    # bytes; rank 256 beside 64, 272).
    capped = half_products and acc_width <= 128 and block_c <= 128
    max_registers = settings["max_registers"] or (128 if capped else None)
    programs_per_sm = settings["programs_per_sm"] or (3 if half_products and not max_registers else 4)
    prefetch_scales = rope_heads == 1 if settings["prefetch_scales"] is None else bool(settings["prefetch_scales"])
    slot_rows = (not half_products) if settings["slot_rows"] is None else bool(settings["slot_rows"])
    splits = splits or slot_splits(batch * head_blocks, slots, block_s, kv_latent.device, programs_per_sm,
                                   bool(settings["whole_waves"]))
    per_split = -(-slots // splits)
    per_split = -(-per_split // block_s) * block_s  # whole tiles: only the last split has a ragged end
    splits = -(-slots // per_split)
    num_warps = num_warps or (8 if block_h * acc_width >= 8192 else 4)
    num_stages = num_stages or 2

    acc = torch.empty(batch, splits, padded_heads, acc_width, device=kv_latent.device, dtype=torch.float32)
    stats_max = torch.empty(batch, splits, padded_heads, device=kv_latent.device, dtype=torch.float32)
    stats_sum = torch.empty_like(stats_max)
    _partial_rope_decode_kernel[(head_blocks, splits, batch)](
        q_lat, q_rope, kv_latent, k_rope, valid if valid is not None else kv_latent,
        length if length is not None else kv_latent,
        kv_latent_scale if has_scales else q_rope, k_rope_scale if has_scales else q_rope,  # unread placeholders
        acc, stats_max, stats_sum,
        q_lat.stride(1), q_lat.stride(0), q_lat.stride(2), q_rope.stride(0), q_rope.stride(1),
        kv_latent.stride(0), kv_latent.stride(1), k_rope.stride(0), k_rope.stride(1), k_rope.stride(2),
        (valid.stride(0) if valid.shape[0] > 1 else 0) if valid is not None else 0,
        *((kv_latent_scale.stride(0), kv_latent_scale.stride(1), k_rope_scale.stride(0), k_rope_scale.stride(2))
          if has_scales else (0, 0, 0, 0)),
        slots, heads, group, rank, heads // rope_heads, rope_heads, block_rope_heads, padded_heads, per_split, splits,
        float(scaling),
        ROPE_DIM=rope_dim, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_R2=block_r2, ACC_WIDTH=acc_width, BLOCK_C=block_c,
        BLOCK_S=block_s,
        HAS_VALID=valid is not None, LENGTH_IN_MEMORY=length is not None,
        SLOT_ROWS=slot_rows, PREFETCH_SLOTS=bool(settings["prefetch_slots"]),
        PREFETCH_SCALES=has_scales and prefetch_scales,
        HAS_SCALES=has_scales, HALF_PRODUCTS=half_products,
        INT8_SCORES=half_products and bool(settings["int8_scores"]) and block_c >= 32,  # an int8 MMA's 32 columns
        num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers,
    )
    # U_v once per query head (sum_c p_c = 1: the bias passes through once).
    return merged_values(acc, stats_max, stats_sum, v_weight, v_bias, kv_heads, group, rank, query_rope.dtype,
                         fused=bool(settings["fused_values"]))


__all__ = ["available", "fits", "partial_rope_decode_attention", "MAX_RANK", "MAX_ROPE_COLUMNS"]
