"""Decode attention over a dense GQA cache whose valid length is read from device memory, in Triton.

One new token per row attends over the first `length` slots of a preallocated cache, the same `length` for every
row (the teacher sampler's batches: every row at the same position), optionally under a per-row mask of valid
slots (a generate() cache: padding, a window's ring). `length` may be a 1-element device tensor, so a CUDA graph
captured once serves every position: slots past it are never read, where masked SDPA over a fixed span reads them
all (and, measured on an H200 at 1,024 x 2,048, cuDNN's masked kernel took 732 us per layer where the bytes allow
~200 us).

Flash-decoding: program (row, KV head, split) reads its split's slots once, for all G query heads of that KV head
at once (the heads are the rows of one [G, D] x [D, BLOCK_S] product, G padded to 16 for tl.dot), with an online
softmax; latent_attention.py's merge kernel merges the splits. Empty splits (past `length`) return max -inf, sum 0.

A 4-bit cache is read as its bytes, each tile's even and odd dims as two tiles (H200, session 25: 18-21% of the
copy bandwidth on its bytes, about the bf16 cache's time). An 8-bit cache (int8 keys and values, a scale per slot
each) is read as stored: the score product in int8 on the keys' bytes (int8_scores), the value tiles made float16
where they are loaded and that product in float16 (half_products; H200, session 25, 128-slot tiles: 43-56% of the
copy bandwidth on its bytes, 0.85-0.94x the bf16 cache's time, which reads at 81-98%; Triton's own conversion took
twice the bf16 cache's time).

Imports triton inside `try`: without it `available()` says False and the caller keeps its PyTorch path.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    # the steps decode kernels share, and flash-decoding's second stage
    from .latent_attention import (dequantized_tile, int8_rows, int8_to_halves, largest_scale, merge_splits,
                                   online_softmax_tile, power_of_two_under, slot_splits, split_slots, unpacked_tiles)
except ImportError:  # CPU-only install
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _gqa_decode_split_kernel(
        Q, K, V, LENGTH, VALID, K_SCALE, V_SCALE, ACC, MAX, SUM,
        stride_qb, stride_qh, stride_qg,  # q [B, Hkv, G, D], D contiguous
        stride_kb, stride_kh, stride_ks,  # keys [B, Hkv, S, D], D contiguous
        stride_vb, stride_vh, stride_vs,  # values likewise
        stride_valid_b,  # valid [B, S] (uint8), slots contiguous
        stride_ksb, stride_kss, stride_vsb, stride_vss,  # a low-bit cache's scales [B, 1, S, 1] (HAS_SCALES)
        kv_heads, group, slots_per_split, scaling, slots,
        HEAD_DIM: tl.constexpr, COLS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
        LENGTH_IN_MEMORY: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SCALES: tl.constexpr,
        HALF_PRODUCTS: tl.constexpr, INT8_SCORES: tl.constexpr, PACKED: tl.constexpr, PREFETCH_SLOTS: tl.constexpr,
    ):
        # HAS_SCALES (an 8-bit cache): each slot's scales multiply what the products give, not the tiles: its key
        # scale its scores, its value scale its weight p. With HALF_PRODUCTS (16-bit queries) both products run in
        # float16 on tiles made float16 where they were loaded (int8_to_halves, exact), the query converted once;
        # their float16 operands are first scaled by powers of two (the query by its largest, the weights p x scale
        # by the split's largest value scale) and what they sum scaled back, as in partial_rope_decode.py, so that
        # a bf16 query past 65,504 does not overflow nor small weights fall among the subnormals. Otherwise each
        # tile is dequantized in float32 and converted to the query's dtype (Triton's conversion: one byte permute
        # per value in the products' operand layout; session 13 measured this path at twice the bf16 cache's time).
        # INT8_SCORES (with HALF_PRODUCTS): the score product in int8 x int8 -> int32 on the tile's bytes as loaded,
        # with no conversion of the keys; the query rounded to int8 once, by a scale per query head (its largest
        # |value| / 127), which with the slot's key scale multiplies what the product gives. The query's rounding
        # adds an error of the order of the keys' own (0.4% of a head's largest value at most, per dim).
        # PACKED (a 4-bit cache, COLS = HEAD_DIM / 2 bytes a slot, byte j holding dims 2j and 2j + 1 in its low and
        # high nibble): each tile's even and odd dims are two tiles (unpacked_tiles, dequantized in float32), the
        # query's even and odd dims two queries, and the value sum two accumulators, interleaved again when stored.
        # PREFETCH_SLOTS: each tile's mask bytes and scales loaded with the tile before it (masked slots' scales
        # zeroed when used: a never written slot's may be anything), so that the tile's key loads, which the mask
        # gates, and its scores do not first wait on them (partial_rope_decode.py's prefetch_slots and
        # prefetch_scales).
        row_head = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        b = (row_head // kv_heads).to(tl.int64)
        h = (row_head % kv_heads).to(tl.int64)
        lo, hi = split_slots(LENGTH, slots, split, slots_per_split, LENGTH_IN_MEMORY)
        g = tl.arange(0, BLOCK_G)
        cols = tl.arange(0, COLS)  # a slot's stored columns: HEAD_DIM values, or HEAD_DIM / 2 bytes (PACKED)
        q_rows = Q + b * stride_qb + h * stride_qh + g[:, None] * stride_qg
        if PACKED:  # q: the even dims, q_odd: the odd ones
            q = tl.load(q_rows + 2 * cols[None, :], mask=g[:, None] < group, other=0.0)
            q_odd = tl.load(q_rows + 2 * cols[None, :] + 1, mask=g[:, None] < group, other=0.0)
            acc_odd = tl.zeros([BLOCK_G, COLS], dtype=tl.float32)
        else:
            q = tl.load(q_rows + cols[None, :], mask=g[:, None] < group, other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        if INT8_SCORES:
            q, q_steps = int8_rows(q.to(tl.float32))  # q_steps [BLOCK_G]
            q_steps = q_steps * scaling
        if HALF_PRODUCTS:
            if not INT8_SCORES:
                query_scale = power_of_two_under(tl.max(tl.abs(q.to(tl.float32))))
                q = (q.to(tl.float32) * query_scale).to(tl.float16)
                score_scale = scaling / query_scale  # exact: 2^-k
            weight_scale = power_of_two_under(largest_scale(V_SCALE + b * stride_vsb, stride_vss, lo, hi))
        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, COLS], dtype=tl.float32)
        valid_row = VALID + b * stride_valid_b
        k_scales = K_SCALE + b * stride_ksb
        v_scales = V_SCALE + b * stride_vsb
        if PREFETCH_SLOTS:
            ahead = lo + tl.arange(0, BLOCK_S)
            if HAS_VALID:
                next_valid = tl.load(valid_row + ahead, mask=ahead < hi, other=0)
            if HAS_SCALES:
                next_k_scale = tl.load(k_scales + ahead * stride_kss, mask=ahead < hi, other=0.0)
                next_v_scale = tl.load(v_scales + ahead * stride_vss, mask=ahead < hi, other=0.0)
        for start in range(lo, hi, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            valid = s < hi
            if PREFETCH_SLOTS:  # this tile's mask bytes and scales came with the last; the next tile's asked for now
                ahead = s + BLOCK_S
                if HAS_VALID:
                    valid = valid & (next_valid != 0)
                    next_valid = tl.load(valid_row + ahead, mask=ahead < hi, other=0)
                if HAS_SCALES:
                    k_scale = tl.where(valid, next_k_scale.to(tl.float32), 0.0)
                    v_scale = tl.where(valid, next_v_scale.to(tl.float32), 0.0)
                    next_k_scale = tl.load(k_scales + ahead * stride_kss, mask=ahead < hi, other=0.0)
                    next_v_scale = tl.load(v_scales + ahead * stride_vss, mask=ahead < hi, other=0.0)
            else:
                if HAS_VALID:
                    valid = valid & (tl.load(valid_row + s, mask=valid, other=0) != 0)
                if HAS_SCALES:  # a low-bit cache: its bytes read, made float in registers
                    k_scale = tl.load(k_scales + s * stride_kss, mask=valid, other=0.0).to(tl.float32)
            k = tl.load(k_base + s[:, None].to(tl.int64) * stride_ks + cols[None, :], mask=valid[:, None], other=0)
            if PACKED:
                k_even, k_odd = unpacked_tiles(k, k_scale)
                scores = tl.dot(q, tl.trans(k_even.to(q.dtype))) + tl.dot(q_odd, tl.trans(k_odd.to(q.dtype)))
                scores = scores * scaling
            elif INT8_SCORES:
                scores = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
                scores = scores * q_steps[:, None] * k_scale[None, :]
            elif HALF_PRODUCTS:
                scores = tl.dot(q, tl.trans(int8_to_halves(k))) * (k_scale * score_scale)[None, :]
            else:
                if HAS_SCALES:
                    k = dequantized_tile(k, k_scale).to(q.dtype)
                scores = tl.dot(q, tl.trans(k)) * scaling  # [BLOCK_G, BLOCK_S], fp32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m, alpha, p, total = online_softmax_tile(scores, m, total)
            v = tl.load(v_base + s[:, None].to(tl.int64) * stride_vs + cols[None, :], mask=valid[:, None], other=0)
            if HAS_SCALES and not PREFETCH_SLOTS:
                v_scale = tl.load(v_scales + s * stride_vss, mask=valid, other=0.0).to(tl.float32)
            if PACKED:
                v_even, v_odd = unpacked_tiles(v, v_scale)
                weights = p.to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(weights, v_even.to(q.dtype))
                acc_odd = acc_odd * alpha[:, None] + tl.dot(weights, v_odd.to(q.dtype))
            elif HALF_PRODUCTS:  # the running sum keeps the unscaled weights
                weights = (p * (v_scale * weight_scale)[None, :]).to(tl.float16)
                acc = acc * alpha[:, None] + tl.dot(weights, int8_to_halves(v))
            else:
                if HAS_SCALES:
                    v = dequantized_tile(v, v_scale).to(q.dtype)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if HALF_PRODUCTS:
            acc = acc * (1.0 / weight_scale)
        out = (row_head * num_splits + split).to(tl.int64) * BLOCK_G + g
        keep = g < group
        if PACKED:
            tl.store(ACC + out[:, None] * HEAD_DIM + 2 * cols[None, :], acc, mask=keep[:, None])
            tl.store(ACC + out[:, None] * HEAD_DIM + 2 * cols[None, :] + 1, acc_odd, mask=keep[:, None])
        else:
            tl.store(ACC + out[:, None] * HEAD_DIM + cols[None, :], acc, mask=keep[:, None])
        tl.store(MAX + out, m, mask=keep)
        tl.store(SUM + out, total, mask=keep)


def fits_head_dim(head_dim: int, packed: bool = False) -> bool:
    """The head sizes the kernel takes: a power of two (tl.arange) of at least 16 (tl.dot); of at least 32 for a
    4-bit cache (`packed`: its even and odd dims are products of half the width)."""
    return head_dim >= (32 if packed else 16) and not head_dim & (head_dim - 1)


def decode_splits(rows: int, slots: int, block: int = 64, target_programs: int = 1024) -> int:
    """Splits of the slot axis so that rows x splits programs fill the GPU (at least one block per split)."""
    return max(1, min(math.ceil(target_programs / max(rows, 1)), math.ceil(slots / block)))


def gqa_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         length: torch.Tensor | None, scaling: float, valid: torch.Tensor | None = None,
                         splits: int | None = None, block_s: int | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, half_products: int = 1, num_warps: int | None = None,
                         num_stages: int | None = None, programs_per_sm: int | None = None,
                         whole_waves: int = 0, int8_scores: int = 1, prefetch_slots: int = 0,
                         max_registers: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling) v over slots [0, length) of the cache, per row and query head.

    Args:
        query: [B, Hkv, G, D], the G query heads of each KV head (one token per row).
        keys, values: [B, Hkv, S, D] caches (a slice of a larger buffer is fine; D contiguous).
        length: 1-element integer device tensor, 1 <= length <= S, read by the kernel (so a graph replays it);
            None: all S slots.
        valid: optional [B or 1, S] boolean mask of the slots a row may attend to (padding, a window's ring);
            every row must keep at least one.
        splits: slot-axis splits (default: from programs_per_sm); block_s: slots per tile (default 128).
        k_scale, v_scale: a low-bit cache's scales [B, 1, S, 1] in the query's dtype, with int8 keys and values (8
            bits), or uint8 ones [B, Hkv, S, D / 2] holding two 4-bit values a byte (dims 2j and 2j + 1 of byte j in
            its low and high nibble, two's complement: modeling_kvforge.quantize_slots).
        half_products: with an 8-bit cache and 16-bit queries, 1: both products in float16 over tiles made float16
            by byte permutes (the kernel's note says how their range is kept); 0: tiles dequantized in float32.
        int8_scores: with half products, 1 (default): the score product in int8 on the keys' bytes, the query
            rounded to int8 by a scale per head (H200, session 25, 128-slot tiles: 14-19% faster, 43-56% of the
            copy bandwidth; on the CPU its error against unquantized attention 1.1-1.8% where the int8 cache's own
            is 0.95-1.5%; head dims of 32 or more, an int8 MMA's depth); 0: in float16 on keys made float16.
        prefetch_slots: 1: each tile's mask bytes and scales loaded with the tile before it (the kernel's note);
            0 (default): with the tile. Not yet timed.
        max_registers: a cap on registers per thread (ptxas spills past it), for more programs an SM: offline (sm_90,
            the 8-bit cache with int8 scores and prefetch_slots) 128 registers fit four programs an SM rather than
            three without a spill. Not yet timed; None: no cap.
        num_warps, num_stages: Triton's (default 4, and 3 stages for a 16-bit cache of heads up to 64 dims, else 2).
        programs_per_sm, whole_waves: the splits aim at that many programs per SM, and with whole_waves stay
            within it (latent_attention.slot_splits, as the other decode kernels); None: three per SM in whole
            waves for a 16-bit cache, `decode_splits`' 1,024 programs for a low-bit one.
    Returns [B, Hkv, G, D] in the query's dtype.
    """
    B, Hkv, G, D = query.shape
    packed = keys.dtype == torch.uint8 and k_scale is not None
    cols = D // 2 if packed else D
    if keys.shape[:2] != (B, Hkv) or keys.shape != values.shape or keys.shape[-1] != cols:
        raise ValueError(f"query {tuple(query.shape)}, keys {tuple(keys.shape)} and values {tuple(values.shape)} "
                         f"must be [B, Hkv, G, D] and [B, Hkv, S, {'D / 2' if packed else 'D'}]")
    if not fits_head_dim(D, packed) or query.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"head dim {D} must be a power of two >= {32 if packed else 16}, contiguous in query, keys "
                         "and values")
    slots = keys.shape[2]
    # 128-slot tiles: 64-slot ones bring too few bytes an iteration (H200, 64 x 4k to 128 x 16k: 8-bit caches
    # 1.3-1.4x faster in session 24, 4-bit 1.5-1.6x and bf16 1.1-1.2x in session 25). A 16-bit cache's splits fill
    # whole waves of three programs per SM (session 25: 81-98% of the copy bandwidth, against 67-90% at 1,024
    # programs); a low-bit cache's keep 1,024 programs (three per SM were 7-23% slower for 8 bits). Three pipeline
    # stages for a 16-bit cache of heads up to 64 dims (session 26, D = 64: 2-5% faster at all four shapes, 82-101%
    # of copy; 8 bits: 3-19% slower); wider heads keep two (not timed: a stage of two 128 x 128 bf16 tiles is 64 KiB).
    block_s = block_s or 128
    if keys.element_size() == 2:
        num_stages = num_stages or (3 if D <= 64 else 2)
        if programs_per_sm is None:
            programs_per_sm, whole_waves = 3, 1
    if not splits:
        splits = (decode_splits(B * Hkv, slots, block_s) if programs_per_sm is None else
                  slot_splits(B * Hkv, slots, block_s, query.device, programs_per_sm, bool(whole_waves)))
    slots_per_split = math.ceil(math.ceil(slots / splits) / block_s) * block_s
    block_g = max(16, triton.next_power_of_2(G))
    # Per (row, head, split): block_g rows of partial results, the first G written.
    acc = torch.empty(B * Hkv, splits, block_g, D, device=query.device, dtype=torch.float32)
    m = torch.empty(B * Hkv, splits, block_g, device=query.device, dtype=torch.float32)
    total = torch.empty_like(m)
    if valid is not None:
        if valid.shape[-1] != slots or valid.shape[0] not in (1, B):
            raise ValueError(f"valid {tuple(valid.shape)} must be [B or 1, S] = [{B} or 1, {slots}]")
        valid = valid.to(torch.uint8).contiguous()
    has_scales = k_scale is not None
    half_products = has_scales and not packed and query.element_size() == 2 and bool(half_products)
    _gqa_decode_split_kernel[(B * Hkv, splits)](
        query, keys, values, length if length is not None else query, valid if valid is not None else query,
        k_scale if has_scales else query, v_scale if has_scales else query, acc, m, total,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        (valid.stride(0) if valid.shape[0] > 1 else 0) if valid is not None else 0,
        k_scale.stride(0) if has_scales else 0, k_scale.stride(2) if has_scales else 0,
        v_scale.stride(0) if has_scales else 0, v_scale.stride(2) if has_scales else 0,
        Hkv, G, slots_per_split, scaling, slots,
        HEAD_DIM=D, COLS=cols, BLOCK_G=block_g, BLOCK_S=block_s,
        LENGTH_IN_MEMORY=length is not None, HAS_VALID=valid is not None, HAS_SCALES=has_scales,
        HALF_PRODUCTS=half_products, INT8_SCORES=half_products and bool(int8_scores) and D >= 32,  # an int8 MMA's K
        PACKED=packed, PREFETCH_SLOTS=bool(prefetch_slots),
        num_warps=num_warps or 4, num_stages=num_stages or 2, maxnreg=max_registers,
    )
    # Merge the splits in one kernel (was nine PyTorch ops per layer): out = sum_s e^(m_s - M) acc_s /
    # sum_s e^(m_s - M) l_s, empty splits weighing 0. Each (row, KV head) is a row of G heads to the merge.
    out = torch.empty(B, Hkv, G, D, device=query.device, dtype=query.dtype)
    merge_splits(acc, m, total, out.view(B * Hkv, G, D), G, G)
    return out
