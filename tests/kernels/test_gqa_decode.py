"""The dense GQA decode kernel (kernels/gqa_decode.py) against softmax attention in float64, on CPU through
Triton's interpreter: lengths that end mid-block and at the end of the cache, one split and several (some empty),
a cache slice of a larger buffer, the length read from a tensor (what lets one CUDA graph serve every position),
masks of valid slots; and generate() of a model with dense, merged-heads and window layers through the dispatch,
equal to generate() without the kernel."""

import os

import pytest
from kernel_generation import assert_same_generation, generate_with_and_without_kernels, record_kernel_calls
import torch

from kvforge.kernels import dispatch
from kvforge.kernels.gqa_decode import available, decode_splits, gqa_decode_attention
from kvforge.models.modeling_kvforge import kv_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def reference(query, keys, values, length, scaling, valid=None):
    q, k, v = query.double(), keys[:, :, :length].double(), values[:, :, :length].double()
    scores = (q @ k.transpose(-1, -2)) * scaling
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :length], float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_triton_is_installed():
    assert available(), "triton is not importable: install the test extra (pip install -e '.[test]')"


@pytest.mark.parametrize("length, splits", [(1, 1), (37, 1), (37, 3), (100, 4), (130, 8), (130, 2)])
def test_decode_attention_matches_softmax_attention(length, splits):
    torch.manual_seed(length * 10 + splits)
    B, Hkv, G, D, capacity = 2, 3, 3, 32, 160
    buffer_k, buffer_v = torch.randn(B, Hkv, capacity + 20, D), torch.randn(B, Hkv, capacity + 20, D)
    keys, values = buffer_k[:, :, :capacity], buffer_v[:, :, :capacity]  # a slice: strides of the buffer
    query = torch.randn(B, Hkv, G, D)
    keys[:, :, length:] = float("nan")  # slots past the length must never be read
    out = gqa_decode_attention(query, keys, values, torch.tensor([length]), 0.125, splits=splits, block_s=16)
    torch.testing.assert_close(out.double(), reference(query, keys, values, length, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_keys_and_values_with_per_slot_scales_match_their_dequantized_attention(bits):
    """A low-bit cache (cache_bits: 8 or 4) hands the kernel its int8 keys and values, or their bytes holding two
    4-bit values each, with one scale per row and slot over every head ([B, 1, S, 1]); the kernel must give
    attention over the same values dequantized in float64 (every dim distinct, so a swapped nibble or an even dim
    stored at an odd place fails)."""
    from kvforge.models.modeling_kvforge import dequantize_slots, quantize_slots

    torch.manual_seed(3)
    B, Hkv, G, D, slots = 2, 3, 3, 32, 70
    query = torch.randn(B, Hkv, G, D)
    (k_q, k_scale), (v_q, v_scale) = (quantize_slots(torch.randn(B, Hkv, slots, D) * 3, 2, bits) for _ in range(2))
    assert k_q.shape[-1] == (D if bits == 8 else D // 2)
    valid = torch.rand(B, slots) > 0.2
    valid[:, 0] = True
    exact = reference(query, dequantize_slots(k_q, k_scale.double()),
                      dequantize_slots(v_q, v_scale.double()), slots, 0.125, valid)
    for splits in (1, 3):
        out = gqa_decode_attention(query, k_q, v_q, None, 0.125, valid=valid, splits=splits, block_s=16,
                                   k_scale=k_scale, v_scale=v_scale)
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_factor, cache_factor", [(1.0, 1.0), (2.0 ** 18, 1.0), (1.0, 2.0 ** -18)])
def test_an_8_bit_cache_beside_16_bit_queries_keeps_its_products_in_range(query_factor, cache_factor):
    """bf16 queries with an 8-bit cache (half products, int8_scores=0): both products run in float16, so a query past
    65,504 would overflow and weights p x scale under 2^-14 lose their precision, unless the operands are scaled by
    powers of two. (half_products=0 keeps bf16 dots, which Triton's interpreter gets wrong.)"""
    from kvforge.models.modeling_kvforge import quantize_slots

    torch.manual_seed(5)
    B, Hkv, G, D, slots = 2, 3, 3, 32, 300
    query = (torch.randn(B, Hkv, G, D) * query_factor).to(torch.bfloat16)
    (k_q, k_scale), (v_q, v_scale) = (quantize_slots((torch.randn(B, Hkv, slots, D) * cache_factor).to(torch.bfloat16),
                                                     2) for _ in range(2))
    valid = torch.rand(B, slots) > 0.2
    valid[:, 0] = True
    out = gqa_decode_attention(query, k_q, v_q, None, 0.125 / query_factor, valid=valid, splits=3, block_s=16,
                               k_scale=k_scale, v_scale=v_scale, int8_scores=0)
    exact = reference(query, k_q.double() * k_scale.double(), v_q.double() * v_scale.double(), slots,
                      0.125 / query_factor, valid)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("query_factor", [1.0, 2.0 ** 18])
def test_int8_scores_over_an_8_bit_cache_stay_within_the_query_rounding(query_factor):
    """int8_scores (the default with 16-bit queries): the score product in int8 on the keys' bytes, the query rounded
    to int8 by a scale per query head. Against float64 attention over the cache's values with the exact query, the
    error is the query's rounding (under 1%; a wrong scale, head or slot is off by O(1)); with a padded head (G = 3
    of 16 rows) and a large query (2^18: no float16 step sees it)."""
    from kvforge.models.modeling_kvforge import quantize_slots

    torch.manual_seed(7)
    B, Hkv, G, D, slots = 2, 3, 3, 32, 300
    query = (torch.randn(B, Hkv, G, D) * query_factor).to(torch.float16 if query_factor == 1.0 else torch.bfloat16)
    (k_q, k_scale), (v_q, v_scale) = (quantize_slots(torch.randn(B, Hkv, slots, D).to(query.dtype) * 2, 2)
                                      for _ in range(2))
    valid = torch.rand(B, slots) > 0.2
    valid[:, 0] = True
    exact = reference(query, k_q.double() * k_scale.double(), v_q.double() * v_scale.double(), slots,
                      0.125 / query_factor, valid)
    for splits in (1, 3):
        out = gqa_decode_attention(query, k_q, v_q, None, 0.125 / query_factor, valid=valid, splits=splits,
                                   block_s=16, k_scale=k_scale, v_scale=v_scale)  # the default
        error = ((out.double() - exact).norm() / exact.norm()).item()
        assert 0 < error < 1e-2
    # The same kernel in float16 products: the int8 query's rounding is the only difference between the two.
    half = gqa_decode_attention(query, k_q, v_q, None, 0.125 / query_factor, valid=valid, splits=3, block_s=16,
                                k_scale=k_scale, v_scale=v_scale, int8_scores=0)
    assert ((half.double() - exact).norm() / exact.norm()).item() < error


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("splits", [1, 3])
def test_mask_and_scales_a_tile_ahead_ignore_masked_slots(bits, splits):
    """prefetch_slots: each tile's mask bytes and scales come with the tile before, masked slots' scales included:
    NaN scales and values in the left padding, in scattered invalid slots and past a length read from a tensor must
    not reach the result (0 x NaN would), across splits whose tiles end mid-way, over bf16-free 16-bit, 8-bit and
    4-bit caches (8 bits: float16 queries, int8 scores)."""
    from kvforge.models.modeling_kvforge import dequantize_slots, quantize_slots

    torch.manual_seed(11)
    B, Hkv, G, D, slots, length = 2, 3, 3, 32, 90, 77
    dtype = torch.float16 if bits == 8 else torch.float32
    query = torch.randn(B, Hkv, G, D).to(dtype)
    keys, values = torch.randn(B, Hkv, slots, D).to(dtype), torch.randn(B, Hkv, slots, D).to(dtype)
    valid = torch.rand(B, slots) > 0.3
    valid[0, :20] = False
    valid[:, 0] = False
    valid[:, 30] = True
    hidden = ~valid
    hidden[:, length:] = True
    if bits == 16:
        scales, exact_keys, exact_values = {}, keys, values
        keys[hidden[:, None, :, None].expand_as(keys)] = float("nan")
    else:
        (keys, k_scale), (values, v_scale) = quantize_slots(keys, 2, bits), quantize_slots(values, 2, bits)
        exact_keys, exact_values = dequantize_slots(keys, k_scale.double()), dequantize_slots(values, v_scale.double())
        for scale in (k_scale, v_scale):
            scale[hidden[:, None, :, None]] = float("nan")
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    exact = reference(query, exact_keys, exact_values, length, 0.125, valid)
    out = gqa_decode_attention(query, keys, values, torch.tensor([length]), 0.125, valid=valid, splits=splits,
                               block_s=16, prefetch_slots=1, **scales)
    assert torch.isfinite(out).all()
    assert ((out.double() - exact).norm() / exact.norm()).item() < (1e-2 if bits == 8 else 1e-5)


def test_splits_cover_the_gpu_and_bad_shapes_are_refused():
    assert decode_splits(3072, 2048) == 1 and decode_splits(12, 2048) == 32 and decode_splits(12, 100) == 2
    query, cache = torch.randn(1, 3, 3, 24), torch.randn(1, 3, 8, 24)
    with pytest.raises(ValueError, match="head dim 24 must be a power of two"):
        gqa_decode_attention(query, cache, cache, torch.tensor([4]), 1.0)
    with pytest.raises(ValueError, match=r"must be \[B, Hkv, G, D\] and \[B, Hkv, S, D\]"):
        gqa_decode_attention(torch.randn(1, 2, 3, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16),
                             torch.tensor([4]), 1.0)


@pytest.mark.parametrize("batch_of_mask", [2, 1])
def test_a_mask_of_valid_slots_is_obeyed_even_when_it_empties_whole_tiles(batch_of_mask):
    """generate()'s caches: left padding, a window ring with holes; the length is then all the slots (no tensor).
    Row 0 loses slots 0-39 (three whole tiles of 16 and part of a fourth), row 1 every other slot."""
    torch.manual_seed(3)
    B, Hkv, G, D, slots = 2, 3, 3, 16, 70
    query, keys, values = torch.randn(B, Hkv, G, D), torch.randn(B, Hkv, slots, D), torch.randn(B, Hkv, slots, D)
    valid = torch.ones(B, slots, dtype=torch.bool)
    valid[0, :40] = False
    valid[1, ::2] = False
    valid = valid[:batch_of_mask]
    keys[:, :, :40][~valid[0, :40].expand(Hkv, -1)[None].expand(B, -1, -1)] = float("nan")  # never read for row 0
    keys[1:] = torch.randn(1, Hkv, slots, D)
    for splits in (1, 3):
        out = gqa_decode_attention(query, keys, values, None, 0.25, valid=valid, splits=splits, block_s=16)
        torch.testing.assert_close(out.double(), reference(query, keys, values, slots, 0.25,
                                                           valid.expand(B, -1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"valid \(2, 69\) must be \[B or 1, S\] = \[2 or 1, 70\]"):
        gqa_decode_attention(query, keys, values, None, 0.25, valid=torch.ones(2, 69, dtype=torch.bool))


def test_auto_serves_the_kernel_on_a_gpu(monkeypatch):
    """Under KVFORGE_KERNELS=auto a dense / merged-heads / window layer's decode step goes to the kernel wherever
    use_triton sends work to Triton (CUDA tensors in bf16 / fp16), behind no further gate: until session 25 only
    KVFORGE_KERNELS=triton opened it, and a plain generate() of the original layout in kvforge decoded in 13.2 ms a
    step rather than 5.6 (H200, B=128 x 4k)."""
    calls = record_kernel_calls(monkeypatch, "gqa_decode_attention")
    monkeypatch.setenv("KVFORGE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "use_triton", lambda tensor, float32_exact=False: True)  # as on a GPU
    attend = dispatch.fused_attention("kv", kv_attention)
    query, keys, values = torch.randn(2, 3, 3, 1, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    mask = torch.ones(2, 1, 1, 1, 40, dtype=torch.bool)
    with torch.no_grad():
        out, _ = attend(query, keys, values, mask, 0.25, use_sdpa=True)
    assert len(calls) == 1
    torch.testing.assert_close(out, kv_attention(query, keys, values, mask, 0.25)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache_bits", [None, 8, 4])
def test_generate_with_the_kernel_equals_generate_without(monkeypatch, cache_bits):
    """Dense, merged-heads, window-ring (with sinks) and kv_from layers, batch 2 with left padding, decoding past
    the window: the same tokens and logits with KVFORGE_KERNELS=triton and =off, the kernel serving every
    layer's decode steps (a kv_from reader attends over its producer's cache too); with a low-bit cache the kernel
    is handed the int8 keys and values, or their packed 4-bit bytes."""
    calls = record_kernel_calls(monkeypatch, "gqa_decode_attention")
    bits = {"cache_bits": cache_bits}
    runs = generate_with_and_without_kernels(
        monkeypatch,
        [bits, {"kv_proj": "merged_heads", "num_kv_heads": 1, **bits},
         {"attention": "window", "window": 6, "sinks": 2, **bits}, {"kv_from": 0}], num_attention_heads=4,
        head_dim=32 if cache_bits == 4 else 16)  # a 4-bit cache's half-width products need 32 dims
    assert len(calls) == 9 * 4  # 9 decode steps x 4 layers
    assert set(calls.dtypes) == {{None: torch.float32, 8: torch.int8, 4: torch.uint8}[cache_bits]}
    assert_same_generation(runs)
