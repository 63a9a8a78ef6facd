"""The fused pre-RoPE latent decode kernel against the PyTorch reference, on CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported): random inputs, ragged ranks, masked
and out-of-order slots, biases, several splits; the dispatch's choices; and whole-model generate() with the
kernel equal to generate() without it."""

import copy
import math
import os

import pytest
from kernel_generation import (assert_kernel_serves_decode_only, assert_same_generation,
                               generate_with_and_without_kernels, record_kernel_calls, relative_error)
import torch
from torch import nn

from kvforge.kernels import dispatch, latent_attention
from kvforge.kernels.latent_attention import available, latent_decode_attention, tile_widths
from kvforge.models.modeling_kvforge import KeyRotary, pre_rope_latent_attention

# triton is a test dependency: its absence fails here rather than skipping every kernel test.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def test_triton_is_installed():
    assert available(), "triton is not importable: install the test extra (pip install -e '.[test]')"


def case(batch=2, kv_heads=3, group=3, dim=16, slots=70, k_rank=24, v_rank=40, bias=True, dtype=torch.float32,
         seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    k_up, v_up = nn.Linear(k_rank, kv_heads * dim, bias=bias), nn.Linear(v_rank, kv_heads * dim, bias=bias)
    with torch.no_grad():
        for linear in (k_up, v_up):
            linear.weight.copy_(rand(*linear.weight.shape) / math.sqrt(linear.in_features))
            if bias:
                linear.bias.copy_(rand(*linear.bias.shape) * 0.1)
    k_up, v_up = k_up.to(dtype), v_up.to(dtype)
    # Slots hold arbitrary positions (a ring layout's or a PyramidKV-compacted cache's), some slots invalid
    # (left padding, empty ring slots), never all of a row.
    positions = torch.randint(0, 4000, (batch, slots), generator=g)
    valid = torch.rand(batch, slots, generator=g) > 0.3
    valid[:, -1] = True
    valid[0, : slots // 2] = False  # a long masked run: whole tiles / splits without a visible slot
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    return dict(query=rand(batch, kv_heads, group, 1, dim), k_latent=rand(batch, slots, k_rank),
                v_latent=rand(batch, slots, v_rank), k_up=k_up, v_up=v_up,
                key_rotary=KeyRotary(positions, inv_freq, 1.0, dtype), mask=valid[:, None, None, None, :],
                scaling=dim ** -0.5)


def reference(c):
    with torch.no_grad():
        out, _ = pre_rope_latent_attention(c["query"].double(), c["k_latent"].double(), c["v_latent"].double(),
                                           copy.deepcopy(c["k_up"]).double(), copy.deepcopy(c["v_up"]).double(),
                                           KeyRotary(c["key_rotary"].positions, c["key_rotary"].inv_freq, 1.0,
                                                     torch.float64),
                                           c["mask"], c["scaling"])
    return out[:, :, :, 0]


def kernel(c, **options):
    r = c["key_rotary"]
    return latent_decode_attention(c["query"][:, :, :, 0], c["k_latent"], c["v_latent"], c["k_up"].weight,
                                   c["k_up"].bias, c["v_up"].weight, c["v_up"].bias, r.positions,
                                   c["mask"][:, 0, 0, 0], r.inv_freq, r.scaling, c["scaling"], **options)


SPLIT = dict(split_columns=1, split_values=1)


def test_tiles_split_into_two_powers_of_two_only_where_that_is_narrower():
    assert tile_widths(96, split=True, multiple=32) == (64, 32)  # SmolLM2's key columns: 3 KV heads x 32 pairs
    assert tile_widths(96, split=False, multiple=32) == (128, 0)
    assert tile_widths(48, split=True, multiple=16) == (32, 16)
    assert tile_widths(192, split=True, multiple=64) == (128, 64)  # 3 KV heads of 128 dims
    assert tile_widths(224, split=True, multiple=32) == (256, 0)  # 128 + 128: no narrower
    assert tile_widths(64, split=True, multiple=32) == (64, 0)  # already a power of two
    assert tile_widths(24, split=True, multiple=8) == (32, 0)  # 16 + 16: dots need 16 columns
    assert tile_widths(144, split=True) == (128, 16)  # a value rank
    assert tile_widths(176, split=True) == (128, 64)
    assert tile_widths(40, split=True) == (32, 16)


@pytest.mark.parametrize("shape", [
    dict(),  # SmolLM2-like grouping: 3 KV heads x 3 query heads, ragged ranks, biases
    dict(dim=32, slots=90),  # 3 KV heads x 16 pairs: two column groups (32 + 16) when split
    dict(kv_heads=1, group=4, dim=32, slots=130, k_rank=16, v_rank=16, bias=False),
    dict(batch=3, kv_heads=2, group=1, dim=16, slots=5, k_rank=7, v_rank=9),  # fewer slots than one tile
])
@pytest.mark.parametrize("num_splits", [1, 3])
# All KV heads in one program (the default); one; 2 of 3 (a ragged last); the next tile's keys loaded before this
# tile's dots; the key columns and value ranks each in two tiles where one would be padded (split); the slots as the
# rows of every product (slot_rows), with the rest; each column group's halves in one product (merged_halves); each
# tile's positions and mask loaded a tile ahead (prefetch_slots: a tile's values paired with the wrong tile's
# positions or mask would miss the reference); the splits' merge and U_v in one kernel (fused_values), also over the
# value ranks' two tiles.
@pytest.mark.parametrize("options", [
    {}, dict(kv_per_program=1), dict(kv_per_program=2), dict(prefetch=1), SPLIT, dict(SPLIT, prefetch=1),
    dict(slot_rows=1), dict(SPLIT, slot_rows=1), dict(slot_rows=1, kv_per_program=2, prefetch=1),
    dict(slot_rows=1, merged_halves=1), dict(SPLIT, slot_rows=1, merged_halves=1, kv_per_program=2),
    dict(prefetch_slots=1), dict(SPLIT, slot_rows=1, prefetch=1, prefetch_slots=1, kv_per_program=2),
    dict(fused_values=1), dict(SPLIT, slot_rows=1, prefetch_slots=1, fused_values=1)], ids=str)
def test_kernel_equals_the_float64_reference(shape, num_splits, options):
    # Fresh inputs for each case, and each shape and options meet both seeds' inputs: seed 0 with one split, seed 1
    # with three (one kernel launch per case: the interpreter runs each for ~0.25 s on CPU).
    c = case(**shape, seed={1: 0, 3: 1}[num_splits])
    out = kernel(c, block_s=16, num_splits=num_splits, **options)
    assert out.shape == c["query"][:, :, :, 0].shape and torch.isfinite(out).all()
    assert relative_error(out, reference(c)) < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("options", [{}, dict(kv_per_program=1), dict(prefetch=1), SPLIT, dict(SPLIT, slot_rows=1)],
                         ids=str)
def test_8_bit_latents_read_as_int8_equal_the_float64_reference(dtype, tolerance, options):
    """An 8-bit cache hands the kernel int8 latents and per-slot scales: it must give what the reference gives on the
    same int8 values dequantized in float64 (the rounding itself is the model's, not the kernel's)."""
    from kvforge.models.modeling_kvforge import quantize_slots

    for num_splits in (1, 3):
        c = case(dtype=dtype, dim=32, slots=70, seed=7 + num_splits)
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1), quantize_slots(c["v_latent"], 1)
        exact = dict(c, k_latent=k_q.double() * k_scale.double(), v_latent=v_q.double() * v_scale.double())
        out = kernel(dict(c, k_latent=k_q, v_latent=v_q), block_s=16, num_splits=num_splits, k_scale=k_scale,
                     v_scale=v_scale, **options)
        assert relative_error(out, reference(exact)) < tolerance


class LaunchSpy:
    """Stands in for the latent kernel during a test: records each launch's WORD_LOADS, then launches."""

    def __init__(self, monkeypatch):
        self.kernel, self.word_loads = latent_attention._latent_decode_kernel, []
        monkeypatch.setattr(latent_attention, "_latent_decode_kernel", self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.word_loads.append(kwargs["WORD_LOADS"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("shape", [
    dict(dim=32, k_rank=24, v_rank=40),  # ragged ranks: the last word of a tile masked, two column groups
    dict(kv_heads=1, group=4, dim=32, slots=130, k_rank=16, v_rank=16, bias=False),
    dict(k_rank=48, v_rank=144, slots=50),  # the aligned 25% model's commonest layer, 128 + 16 value columns
])
@pytest.mark.parametrize("options", [dict(word_loads=1), dict(SPLIT, slot_rows=1, word_loads=1),
                                     dict(SPLIT, slot_rows=1, word_loads=1, merged_halves=1),
                                     dict(SPLIT, slot_rows=1, word_loads=1, prefetch_slots=1)], ids=str)
def test_8_bit_latents_read_as_words_equal_the_float64_reference(monkeypatch, shape, options):
    """word_loads: the int8 latents read four to a 32-bit word and made float16 in registers, the key scales applied
    to the scores. In the interpreter the bytes come apart by shifts where the GPU permutes them; the order of the
    values and every scale are what this checks. The launch must take the word path (ranks multiples of 4)."""
    from kvforge.models.modeling_kvforge import quantize_slots

    spy = LaunchSpy(monkeypatch)
    for num_splits in (1, 3):
        c = case(dtype=torch.float16, **shape, seed=11 + num_splits)
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1), quantize_slots(c["v_latent"], 1)
        exact = dict(c, k_latent=k_q.double() * k_scale.double(), v_latent=v_q.double() * v_scale.double())
        out = kernel(dict(c, k_latent=k_q, v_latent=v_q), block_s=16, num_splits=num_splits, k_scale=k_scale,
                     v_scale=v_scale, **options)
        assert relative_error(out, reference(exact)) < 5e-3
    assert spy.word_loads == [True, True]


@pytest.mark.parametrize("cache_bits", [None, 8])
def test_a_float16_rope_table_stays_within_half_precision_error(cache_bits):
    """half_rope_table: cos/sin read as float16 (rotation still in float32), against the float64 reference."""
    from kvforge.models.modeling_kvforge import quantize_slots

    c = case(dtype=torch.float16, dim=32, slots=70, seed=5)
    options = {}
    if cache_bits:
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1), quantize_slots(c["v_latent"], 1)
        exact = dict(c, k_latent=k_q.double() * k_scale.double(), v_latent=v_q.double() * v_scale.double())
        c, options = dict(c, k_latent=k_q, v_latent=v_q), dict(k_scale=k_scale, v_scale=v_scale)
    else:
        exact = c
    out = kernel(c, block_s=16, num_splits=2, half_rope_table=1, **options)
    assert relative_error(out, reference(exact)) < 5e-3


def test_rope_tables_are_kept_per_dtype_and_grow():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    single = latent_attention.rope_table(inv_freq, 1.0, 100)
    half = latent_attention.rope_table(inv_freq, 1.0, 100, torch.float16)
    assert single.dtype == torch.float32 and half.dtype == torch.float16 and half.shape == single.shape
    assert latent_attention.rope_table(inv_freq, 1.0, 100) is single  # kept
    assert torch.equal(half, single.half())
    small = half.clone()
    grown = latent_attention.rope_table(inv_freq, 1.0, 3000, torch.float16)
    assert grown.shape[0] >= 3000 and torch.equal(grown[:small.shape[0]], small)
    # outgrown, still held (a captured graph may read it by address) and unchanged
    assert any(t is half for t in inv_freq._kvforge_outgrown_rope_tables) and torch.equal(half, small)
    double = latent_attention.rope_table(inv_freq, 2.0, 100)
    assert double is not single and torch.equal(double, 2 * single)  # a new scaling: its own tables
    assert latent_attention.rope_table(inv_freq, 1.0, 100) is single  # the first scaling's kept beside it


def test_word_loads_fall_back_where_a_row_does_not_start_on_a_word(monkeypatch):
    """A key rank of 10 puts rows 10 bytes apart: the launch reads bytes as before, and still right."""
    from kvforge.models.modeling_kvforge import quantize_slots

    spy = LaunchSpy(monkeypatch)

    c = case(dtype=torch.float16, k_rank=10, v_rank=34, slots=40, seed=3)
    (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1), quantize_slots(c["v_latent"], 1)
    exact = dict(c, k_latent=k_q.double() * k_scale.double(), v_latent=v_q.double() * v_scale.double())
    out = kernel(dict(c, k_latent=k_q, v_latent=v_q), block_s=16, k_scale=k_scale, v_scale=v_scale, word_loads=1)
    assert relative_error(out, reference(exact)) < 5e-3
    assert spy.word_loads == [False]


@pytest.mark.parametrize("shape", [
    dict(slots=70),  # ragged even ranks (24, 40), biases
    dict(dim=32, slots=70),  # two column groups when split
    dict(kv_heads=1, group=4, dim=32, slots=130, k_rank=16, v_rank=16, bias=False),
    dict(batch=3, kv_heads=2, group=1, dim=16, slots=5, k_rank=10, v_rank=34),  # fewer slots than one tile
    dict(k_rank=190, v_rank=150, slots=40),  # the largest ranks held whole (a 4-bit 12.5% model's value ranks)
])
@pytest.mark.parametrize("dtype, tolerance, options", [
    (torch.float32, 1e-5, {}), (torch.float16, 5e-3, {}), (torch.float32, 1e-5, dict(prefetch=1)),
    (torch.float16, 5e-3, SPLIT), (torch.float32, 1e-5, dict(SPLIT, slot_rows=1)),
    (torch.float32, 1e-5, dict(prefetch=1, prefetch_slots=1)), (torch.float16, 5e-3, dict(fused_values=1))], ids=str)
def test_4_bit_latents_read_as_packed_bytes_equal_the_float64_reference(shape, dtype, tolerance, options):
    """A 4-bit cache hands the kernel uint8 latents, two values per byte, and per-slot scales: it must give what the
    reference gives on the same values dequantized in float64."""
    from kvforge.models.modeling_kvforge import dequantize_slots, quantize_slots

    for num_splits in (1, 3):
        c = case(**shape, dtype=dtype, seed=13 + num_splits)
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1, 4), quantize_slots(c["v_latent"], 1, 4)
        assert k_q.dtype == torch.uint8 and k_q.shape[-1] == c["k_latent"].shape[-1] // 2
        exact = dict(c, k_latent=dequantize_slots(k_q, k_scale.double()),
                     v_latent=dequantize_slots(v_q, v_scale.double()))
        # One program per KV head with the splits (kv_per_program 1), all KV heads in one without them.
        out = kernel(dict(c, k_latent=k_q, v_latent=v_q), block_s=16, num_splits=num_splits, k_scale=k_scale,
                     v_scale=v_scale, kv_per_program=1 if num_splits > 1 else None, **options)
        assert relative_error(out, reference(exact)) < tolerance


@pytest.mark.parametrize("shape", [
    dict(slots=70),  # ranks 24 / 40: 12 and 20 bytes, the last word of a tile masked; biases
    dict(kv_heads=1, group=4, dim=32, slots=130, k_rank=16, v_rank=16, bias=False),
])
@pytest.mark.parametrize("options", [dict(word_loads=1), dict(SPLIT, slot_rows=1, word_loads=1, prefetch_slots=1)],
                         ids=str)
def test_4_bit_latents_read_as_words_equal_the_float64_reference(monkeypatch, shape, options):
    """word_loads on a 4-bit cache: each word's eight nibbles made float16 (even ranks from the low nibbles, odd
    from the high ones), the key scales on the scores. The interpreter takes the nibbles apart by shifts where the
    GPU masks them; which nibble is which rank, signs and scales are what this checks. The launch must take the
    word path (stored columns multiples of 4)."""
    from kvforge.models.modeling_kvforge import dequantize_slots, quantize_slots

    spy = LaunchSpy(monkeypatch)
    for num_splits in (1, 3):
        c = case(**shape, dtype=torch.float16, seed=17 + num_splits)
        (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1, 4), quantize_slots(c["v_latent"], 1, 4)
        exact = dict(c, k_latent=dequantize_slots(k_q, k_scale.double()),
                     v_latent=dequantize_slots(v_q, v_scale.double()))
        out = kernel(dict(c, k_latent=k_q, v_latent=v_q), block_s=16, num_splits=num_splits, k_scale=k_scale,
                     v_scale=v_scale, **options)
        assert relative_error(out, reference(exact)) < 5e-3
    assert spy.word_loads == [True, True]


def test_a_4_bit_key_latent_above_what_the_kernel_holds_is_refused_and_the_dispatch_keeps_it_on_pytorch(
        monkeypatch, kernel_calls):
    from kvforge.models.modeling_kvforge import quantize_slots

    c = case(k_rank=258, v_rank=16, slots=20, seed=2)
    (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1, 4), quantize_slots(c["v_latent"], 1, 4)
    with pytest.raises(ValueError, match="4-bit key latent of rank 258 is above the kernel's 256"):
        kernel(dict(c, k_latent=k_q, v_latent=v_q), k_scale=k_scale, v_scale=v_scale)
    monkeypatch.setenv("KVFORGE_KERNELS", "triton")
    attend = dispatch.fused_attention("pre_rope_latent", pre_rope_latent_attention)
    args = [c[k] for k in ("query", "k_latent", "v_latent", "k_up", "v_up", "key_rotary", "mask", "scaling")]
    args[1:3] = k_q, v_q
    with torch.no_grad():
        out, _ = attend(*args, k_scale=k_scale, v_scale=v_scale)
        expected, _ = pre_rope_latent_attention(*args, k_scale=k_scale, v_scale=v_scale)
    assert not kernel_calls
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("cache_bits", [None, 8])
def test_large_key_ranks_read_the_up_projection_in_chunks(cache_bits):
    """Key ranks above 128 (the 50% model in 8 bits: up to 192) read U_k in chunks of 64 rows per tile, since its
    two whole tiles need more shared memory than an H200 has; small ranks can be forced through the same path."""
    from kvforge.models.modeling_kvforge import quantize_slots

    for shape, chunk in ((dict(k_rank=150, v_rank=40, slots=40), None), (dict(k_rank=40, v_rank=24, slots=40), 16)):
        c = case(**shape, seed=11)
        options = dict(block_s=16, num_splits=2, chunk_rk=chunk, kv_per_program=1 if chunk else None)
        if cache_bits:
            (k_q, k_scale), (v_q, v_scale) = quantize_slots(c["k_latent"], 1), quantize_slots(c["v_latent"], 1)
            out = kernel(dict(c, k_latent=k_q, v_latent=v_q), k_scale=k_scale, v_scale=v_scale, **options)
            c = dict(c, k_latent=k_q.double() * k_scale.double(), v_latent=v_q.double() * v_scale.double())
        else:
            out = kernel(c, **options)
        assert relative_error(out, reference(c)) < 1e-5


def test_half_precision_inputs_stay_within_half_precision_error():
    c = case(dtype=torch.float16, slots=96, seed=3)
    assert relative_error(kernel(c, block_s=32, num_splits=2), reference(c)) < 5e-3


def test_a_masked_slot_contributes_nothing():
    c = case(seed=4)
    out = kernel(c, block_s=16)
    hidden = ~c["mask"][:, 0, 0, 0]
    # Large values where the mask says no: any leak would dominate. (Caches never hold NaN: fresh slots are
    # zero-filled, as 0 * NaN would poison probs @ V in any implementation.)
    c["k_latent"][hidden] = 1e4
    c["v_latent"][hidden] = -1e4
    assert torch.allclose(kernel(c, block_s=16), out, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Dispatch


@pytest.fixture
def kernel_calls(monkeypatch):
    return record_kernel_calls(monkeypatch, "latent_decode_attention")


def test_dispatch_runs_the_kernel_only_where_it_applies(monkeypatch, kernel_calls):
    attend = dispatch.fused_attention("pre_rope_latent", pre_rope_latent_attention)
    c = case(seed=5)
    args = [c[k] for k in ("query", "k_latent", "v_latent", "k_up", "v_up", "key_rotary", "mask", "scaling")]
    assert_kernel_serves_decode_only(monkeypatch, attend, args, kernel_calls)
    monkeypatch.setenv("KVFORGE_KERNELS", "fast")
    with pytest.raises(ValueError, match="KVFORGE_KERNELS='fast' is not one of auto, off, triton"):
        attend(*args)
    assert dispatch.fused_attention("shared_probs", pre_rope_latent_attention) is pre_rope_latent_attention


def test_a_kernel_too_big_for_the_gpu_falls_back_to_the_reference_once(monkeypatch):
    """Session 10 on an H200: ranks 192 + 192 (the 50% model with 8-bit latents) needed 287 KiB of shared memory of
    227 and generate() crashed in Triton's compile. Now the reference serves that shape, with one warning, and the
    kernel is not compiled again for it."""
    from kvforge.kernels.latent_attention import OutOfResources

    attempts = []

    def too_big(*args, **kwargs):
        attempts.append(args[1].shape)
        raise OutOfResources(287232, 232448, "shared memory")

    monkeypatch.setattr(dispatch, "latent_decode_attention", too_big)
    monkeypatch.setattr(dispatch, "_TOO_BIG", set())
    monkeypatch.setenv("KVFORGE_KERNELS", "triton")
    attend = dispatch.fused_attention("pre_rope_latent", pre_rope_latent_attention)
    c = case(seed=5)
    args = [c[k] for k in ("query", "k_latent", "v_latent", "k_up", "v_up", "key_rotary", "mask", "scaling")]
    with torch.no_grad():
        expected, _ = pre_rope_latent_attention(*args)
        with pytest.warns(UserWarning, match="pre-RoPE latent decode kernel does not fit this GPU"):
            out, _ = attend(*args)
        again, _ = attend(*args)
    assert len(attempts) == 1
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(again, expected)


@pytest.mark.parametrize("cache_bits, slot_rows", [(None, 0), (8, 0), (4, 0), (8, 1), (4, 1)])
def test_generate_with_the_kernel_equals_generate_without(monkeypatch, kernel_calls, cache_bits, slot_rows):
    """A tiny model with latent layers (a global owner, a window layer, a kv_from reader), batch 2 with left
    padding, decoding past the window: same tokens and logits with KVFORGE_KERNELS=triton and =off; with a low-bit
    cache the kernel is handed the stored bytes (int8, or uint8 packing two 4-bit values), never a dequantized copy.
    Also with the kernel's products laid out with the slots as rows (its launch default slot_rows)."""
    from kvforge.kernels import latent_attention

    monkeypatch.setitem(latent_attention.LAUNCH_DEFAULTS, "slot_rows", slot_rows)
    low_rank = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": cache_bits}
    runs = generate_with_and_without_kernels(
        monkeypatch,
        [low_rank, {"kv_from": 0}, {**low_rank, "attention": "window", "window": 8, "sinks": 2}], num_attention_heads=6)
    assert len(kernel_calls) == 9 * 3  # 9 decode steps x 3 layers attending over a latent cache
    assert set(kernel_calls.dtypes) == {{None: torch.float32, 8: torch.int8, 4: torch.uint8}[cache_bits]}
    assert_same_generation(runs)


def test_rope_table_matches_the_model_rotary_and_grows_when_needed():
    from kvforge.kernels.latent_attention import rope_table

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    positions = torch.tensor([[0, 5, 1999]])
    cos, sin = KeyRotary(positions, inv_freq, 0.5, torch.float32).tables()  # what the PyTorch path rotates with
    table = rope_table(inv_freq, 0.5, 2000)
    assert table.shape[0] >= 2000 and rope_table(inv_freq, 0.5, 10) is table  # kept on inv_freq, reused
    assert torch.equal(table[positions[0], :8], cos[0, :, :8]) and torch.equal(table[positions[0], 8:], sin[0, :, :8])
    assert rope_table(inv_freq, 0.5, 5000).shape[0] >= 5000  # grown
    assert torch.equal(rope_table(inv_freq, 1.0, 10)[5, :8], (5 * inv_freq).cos())  # another scaling: rebuilt
