"""The absorbed partial-RoPE decode kernel (kernels/partial_rope_decode.py) against the PyTorch reference in
float64, on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported): a rotary key per KV head (Kr = K) and one shared by all heads (Kr = 1), ranks and rotary widths that
are not powers of two, several head blocks and splits, lengths that end mid-tile, masked slots and left padding,
the length read from a tensor; the dispatch's choices; and whole-model generate() with the kernel equal to
generate() without it."""

import copy
import os
import warnings

import pytest
from kernel_generation import (assert_kernel_serves_decode_only, assert_same_generation,
                               generate_with_and_without_kernels, record_kernel_calls, relative_error)
import torch
from torch import nn

from kvforge.kernels import dispatch
from kvforge.kernels.latent_attention import tile_widths
from kvforge.kernels.partial_rope_decode import available, fits, partial_rope_decode_attention, rope_heads_per_block
from kvforge.models.modeling_kvforge import ATTENTION_FUNCTIONS, partial_rope_attention, quantize_slots

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def test_triton_is_installed():
    assert available(), "triton is not importable: install the test extra (pip install -e '.[test]')"


def case(batch=2, kv_heads=2, group=3, rope_dim=8, nope_dim=8, rank=24, slots=37, rope_heads=None,
         dtype=torch.float32, seed=0):
    """Inputs of partial_rope_attention for one decode token: row 0 left-padded (its first 9 slots invalid), row 1
    with scattered invalid slots; never a row without a visible slot."""
    g = torch.Generator().manual_seed(seed)
    rope_heads = kv_heads if rope_heads is None else rope_heads

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    with warnings.catch_warnings():  # nope_dim = 0 (every dim rotary) leaves k_up empty; torch warns on its init
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        k_up = nn.Linear(rank, kv_heads * nope_dim, bias=False)
    v_up = nn.Linear(rank, kv_heads * (rope_dim + nope_dim), bias=True)
    with torch.no_grad():
        k_up.weight.copy_(rand(*k_up.weight.shape, scale=rank ** -0.5))
        v_up.weight.copy_(rand(*v_up.weight.shape, scale=rank ** -0.5))
        v_up.bias.copy_(rand(*v_up.bias.shape, scale=0.1))
    valid = torch.ones(batch, slots, dtype=torch.bool)
    valid[0, :min(9, slots - 1)] = False
    if batch > 1:
        valid[1] = torch.rand(slots, generator=g) > 0.3
        valid[1, -1] = True
    return dict(query_rope=rand(batch, kv_heads, group, 1, rope_dim),
                query_nope=rand(batch, kv_heads, group, 1, nope_dim),
                k_rope=rand(batch, rope_heads, slots, rope_dim), kv_latent=rand(batch, slots, rank),
                k_up=k_up.to(dtype), v_up=v_up.to(dtype), mask=valid[:, None, None, None, :],
                scaling=(rope_dim + nope_dim) ** -0.5)


ARGS = ("query_rope", "query_nope", "k_rope", "kv_latent", "k_up", "v_up", "mask", "scaling")


def reference(c, length=None):
    """partial_rope_attention (absorbed, as for decode) in float64, over the first `length` slots."""
    c = dict(c)
    if length is not None:
        c["k_rope"], c["kv_latent"], c["mask"] = c["k_rope"][:, :, :length], c["kv_latent"][:, :length], \
            c["mask"][..., :length]
    with torch.no_grad():
        out, _ = partial_rope_attention(
            c["query_rope"].double(), c["query_nope"].double(), c["k_rope"].double(), c["kv_latent"].double(),
            copy.deepcopy(c["k_up"]).double(), copy.deepcopy(c["v_up"]).double(), c["mask"], c["scaling"],
            absorb=True)
    return out[:, :, :, 0]


def kernel(c, **options):
    options.setdefault("valid", c["mask"][:, 0, 0, 0])
    return partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"],
                                         c["kv_latent"], c["k_up"].weight, c["v_up"].weight, c["v_up"].bias,
                                         c["scaling"], **options)


@pytest.mark.parametrize("shape", [
    dict(),  # Kr = K: a rotary key per KV head, 3 query heads each
    dict(rope_heads=1, rope_dim=6, nope_dim=10, rank=40, slots=70),  # shared rotary key (MLA), Dr and R not 2^n
    dict(batch=3, kv_heads=4, group=1, rope_dim=4, nope_dim=4, rank=16, slots=5),  # MHA, fewer slots than a tile
    dict(kv_heads=6, group=3, rope_dim=2, nope_dim=6, rank=12, slots=50),  # 18 heads: two blocks of 16
    dict(kv_heads=6, group=3, rope_dim=2, nope_dim=6, rank=12, slots=50, rope_heads=1),
    dict(kv_heads=20, group=1, rope_dim=4, nope_dim=4, rank=16, slots=21),  # MHA, 20 rope heads: blocks of 16 + 4
    dict(kv_heads=1, group=4, rope_dim=8, nope_dim=0, rank=20, slots=33),  # every dim rotary: q_nope empty
])
# prefetch_slots: the mask bytes loaded a tile ahead, across split ends (3 splits) and ragged last tiles;
# fused_values: the splits' merge and U_v in one kernel
@pytest.mark.parametrize("splits, prefetch_slots, fused_values", [(1, 0, 0), (3, 1, 0), (3, 1, 1)])
@pytest.mark.parametrize("slot_rows", [0, 1])  # the products with the heads or the slots as their rows
def test_kernel_equals_the_float64_reference(shape, splits, prefetch_slots, fused_values, slot_rows):
    c = case(**shape, seed=splits)
    out = kernel(c, block_s=16, block_h=16, splits=splits, slot_rows=slot_rows, prefetch_slots=prefetch_slots,
                 fused_values=fused_values)
    assert out.shape == c["query_rope"].shape[:3] + (c["v_up"].weight.shape[0] // c["query_rope"].shape[1],)
    assert torch.isfinite(out).all()
    assert relative_error(out, reference(c)) < 1e-5


@pytest.mark.parametrize("slot_rows, prefetch_slots", [(0, 0), (1, 0), (1, 1)])
def test_masked_slots_and_slots_past_the_length_are_never_read(slot_rows, prefetch_slots):
    """NaN in every invalid slot and past a length read from a tensor (one CUDA graph for every position); a mask
    of one row shared by the batch; a whole split past the length (empty)."""
    c = case(kv_heads=2, group=2, rank=20, slots=64, seed=7)
    c["mask"] = c["mask"][:1]  # [1, C]: row 0's left padding for both rows
    length = 41
    expected = reference(c, length)  # before the poison: the reference multiplies masked values by 0
    hidden = ~c["mask"][0, 0, 0, 0]
    hidden[length:] = True
    c["kv_latent"][:, hidden] = float("nan")
    c["k_rope"][:, :, hidden] = float("nan")
    out = kernel(c, length=torch.tensor([length]), block_s=16, splits=4, slot_rows=slot_rows,
                 prefetch_slots=prefetch_slots)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("shape", [dict(), dict(rope_heads=1, rope_dim=6, nope_dim=10, rank=40, slots=70)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("slot_rows, block_h, half_products",
                         [(0, 16, 0), (1, 16, 0), (1, 16, 1), (0, 16, 1), (0, 64, 1)])
def test_an_8_bit_cache_is_read_as_stored(shape, dtype, tolerance, slot_rows, block_h, half_products):
    """int8 k_rope and kv_latent with their per-slot scales (quantize_slots, as a cache_bits: 8 layer stores them)
    against the reference on the same values dequantized in float64; every slot's scales differ, so a scale applied
    to the wrong slot, left off the value sum, or put on the running sum fails. half_products (float16 products,
    float16 queries only) with the heads as the rows (16, the default for it, and padded to 64), and with the slots
    as the rows."""
    c = case(**shape, dtype=dtype, seed=5)
    (k_rope, k_rope_scale), (kv_latent, kv_latent_scale) = quantize_slots(c["k_rope"], 2), quantize_slots(
        c["kv_latent"], 1)
    expected = reference(dict(c, k_rope=k_rope.double() * k_rope_scale.double(),
                              kv_latent=kv_latent.double() * kv_latent_scale.double()))
    out = kernel(dict(c, k_rope=k_rope, kv_latent=kv_latent), block_s=16, splits=3, slot_rows=slot_rows,
                 block_h=block_h, half_products=half_products, k_rope_scale=k_rope_scale,
                 kv_latent_scale=kv_latent_scale)
    assert relative_error(out, expected) < tolerance
    with pytest.raises(ValueError, match=r"an 8-bit cache takes int8 k_rope and kv_latent with both scales"):
        kernel(dict(c, k_rope=k_rope, kv_latent=kv_latent), k_rope_scale=k_rope_scale,
               kv_latent_scale=kv_latent_scale[:, :-1])


@pytest.mark.parametrize("slot_rows", [0, 1])
@pytest.mark.parametrize("prefetch_scales", [0, 1])
def test_an_8_bit_cache_ignores_the_scales_of_masked_slots(prefetch_scales, slot_rows):
    """prefetch_scales loads a tile's scales with the tile before it, masked slots' included: NaN scales (a never
    written slot's may be anything) in the left padding, in scattered invalid slots and past a length read from a
    tensor must not reach the result (0 x NaN would), across three splits whose tiles end mid-way."""
    c = case(rank=40, slots=64, dtype=torch.float16, seed=12)
    (k_rope, k_rope_scale), (kv_latent, kv_latent_scale) = quantize_slots(c["k_rope"], 2), quantize_slots(
        c["kv_latent"], 1)
    length = 53
    expected = reference(dict(c, k_rope=k_rope[:, :, :length].double() * k_rope_scale[:, :, :length].double(),
                              kv_latent=kv_latent[:, :length].double() * kv_latent_scale[:, :length].double(),
                              mask=c["mask"][..., :length]))
    hidden = ~c["mask"][:, 0, 0, 0]  # [B, C]
    hidden[:, length:] = True
    k_rope_scale[hidden[:, None, :, None].expand_as(k_rope_scale)] = float("nan")
    kv_latent_scale[hidden[:, :, None]] = float("nan")
    out = kernel(dict(c, k_rope=k_rope, kv_latent=kv_latent), length=torch.tensor([length]), block_s=16, splits=3,
                 slot_rows=slot_rows, prefetch_scales=prefetch_scales, k_rope_scale=k_rope_scale,
                 kv_latent_scale=kv_latent_scale)
    assert torch.isfinite(out).all()
    assert relative_error(out, expected) < 5e-3


@pytest.mark.parametrize("slot_rows", [0, 1])
@pytest.mark.parametrize("dtype, bits, tolerance", [(torch.float32, 16, 1e-5), (torch.float16, 8, 5e-3)])
@pytest.mark.parametrize("rank, rope_heads", [(40, 1), (96, 2)])
def test_split_latent_columns_equal_the_reference(rank, rope_heads, dtype, bits, tolerance, slot_rows):
    """split_columns: a rank one tile would pad (40 as 32 + 16 rather than 64, 96 as 64 + 32 rather than 128) in
    two tiles, each column's score, value sum and stored accumulator from its own tile; a column dropped, doubled or
    stored at the other tile's offset fails. bf16-free: float32 over a 16-bit cache, float16 queries over an 8-bit
    one (its half products and int8 rotary scores)."""
    assert tile_widths(rank, True)[1] > 0  # the case splits
    c = case(rope_heads=rope_heads, rank=rank, slots=70, dtype=dtype, seed=9)
    scales = {}
    if bits == 8:
        (k_rope, scales["k_rope_scale"]), (kv_latent, scales["kv_latent_scale"]) = (
            quantize_slots(c["k_rope"], 2), quantize_slots(c["kv_latent"], 1))
        c = dict(c, k_rope=k_rope, kv_latent=kv_latent)
    expected = reference(dict(c, k_rope=c["k_rope"].double() * scales.get("k_rope_scale", 1.0),
                              kv_latent=c["kv_latent"].double() * scales.get("kv_latent_scale", 1.0)))
    out = kernel(c, block_s=16, splits=3, slot_rows=slot_rows, split_columns=1, **scales)
    assert relative_error(out, expected) < tolerance


@pytest.mark.parametrize("slot_rows", [0, 1])
@pytest.mark.parametrize("shape", [dict(rope_dim=16), dict(rope_heads=1, rope_dim=32, nope_dim=10, rank=40, slots=70)])
def test_int8_rotary_scores_stay_within_the_query_rounding(shape, slot_rows):
    """int8_scores: the rotary score product in int8 on the rotary keys' bytes, the rotary query rounded to int8 by
    a scale per head; against float64 attention over the cache's values with the exact queries the error is that
    rounding's (a scale on the wrong head or slot is O(1) off), with per-head rotary keys and one shared by all."""
    c = case(**shape, dtype=torch.float16, seed=6)
    (k_rope, k_rope_scale), (kv_latent, kv_latent_scale) = quantize_slots(c["k_rope"], 2), quantize_slots(
        c["kv_latent"], 1)
    expected = reference(dict(c, k_rope=k_rope.double() * k_rope_scale.double(),
                              kv_latent=kv_latent.double() * kv_latent_scale.double()))
    out = kernel(dict(c, k_rope=k_rope, kv_latent=kv_latent), block_s=16, splits=3, slot_rows=slot_rows,
                 int8_scores=1, k_rope_scale=k_rope_scale, kv_latent_scale=kv_latent_scale)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("slot_rows", [0, 1])
@pytest.mark.parametrize("query_factor, cache_factor", [(2.0 ** 18, 1.0), (1.0, 2.0 ** -18)])
def test_an_8_bit_cache_keeps_its_float16_products_in_range(slot_rows, query_factor, cache_factor):
    """bf16 queries past float16's 65,504, or latents so small that every weight x scale falls among float16's
    subnormals: the kernel's float16 products (half_products) scale their operands by powers of two. Without that
    the first case is NaN and the second 0.19 off. (U_v without its bias, which would hide the value sum; and
    fused_values off: the interpreter's bf16 dots in the fused merge are unreliable.)"""
    c = case(rope_heads=1, rank=32, slots=300, dtype=torch.bfloat16, seed=11)
    c = dict(c, query_rope=c["query_rope"] * query_factor, query_nope=c["query_nope"] * query_factor,
             k_rope=c["k_rope"] * cache_factor, kv_latent=c["kv_latent"] * cache_factor)
    nn.init.zeros_(c["v_up"].bias)
    (k_rope, k_rope_scale), (kv_latent, kv_latent_scale) = quantize_slots(c["k_rope"], 2), quantize_slots(
        c["kv_latent"], 1)
    expected = reference(dict(c, k_rope=k_rope.double() * k_rope_scale.double(),
                              kv_latent=kv_latent.double() * kv_latent_scale.double()))
    out = kernel(dict(c, k_rope=k_rope, kv_latent=kv_latent), block_s=16, splits=2, slot_rows=slot_rows,
                 half_products=1, fused_values=0, k_rope_scale=k_rope_scale, kv_latent_scale=kv_latent_scale)
    assert relative_error(out, expected) < 1e-2


def test_half_precision_inputs_stay_within_half_precision_error():
    c = case(rope_heads=1, rank=32, slots=48, dtype=torch.float16, seed=3)
    assert relative_error(kernel(c, block_s=16, splits=2), reference(c)) < 5e-3


def test_shapes_the_kernel_refuses():
    assert rope_heads_per_block(18, 6, 16) == 6 and rope_heads_per_block(18, 6, 32) == 6
    assert rope_heads_per_block(32, 32, 16) == 16 and rope_heads_per_block(32, 1, 16) == 1
    assert fits(18, 6, 6, 12, 2) and fits(128, 128, 1, 512, 64)  # DeepSeek-V2/V3 MLA decode shape
    assert not fits(8, 4, 2, 24, 8)  # two rope heads for four KV heads: no layout the kernel knows
    assert not fits(8, 4, 4, 2048, 8)  # rank past MAX_RANK
    c = case(kv_heads=4, group=1, rope_heads=2)
    with pytest.raises(ValueError, match=r"k_rope with 2 heads \(1 or K = 4\), rank 24 .* use partial_rope_attention"):
        kernel(c)
    c = case()
    with pytest.raises(ValueError, match=r"must be \[B, K, G, Dr\]"):
        partial_rope_decode_attention(c["query_rope"][:, :, :, 0], c["query_nope"][:, :, :, 0], c["k_rope"][:1],
                                      c["kv_latent"], c["k_up"].weight, c["v_up"].weight, None, 1.0)
    with pytest.raises(ValueError, match=r"valid \(2, 36\) must be \[B or 1, C\] = \[2 or 1, 37\]"):
        kernel(c, valid=torch.ones(2, 36, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# Dispatch


@pytest.fixture
def kernel_calls(monkeypatch):
    return record_kernel_calls(monkeypatch, "partial_rope_decode_attention")


@pytest.mark.parametrize("rope_heads", [None, 1])
def test_dispatch_runs_the_kernel_only_where_it_applies(monkeypatch, kernel_calls, rope_heads):
    attend = dispatch.fused_attention("partial", partial_rope_attention)
    c = case(rope_heads=rope_heads, seed=5)
    args = [c[k] for k in ARGS]
    assert_kernel_serves_decode_only(monkeypatch, attend, args, kernel_calls)
    with torch.no_grad():
        attend(*args, absorb=False)  # the caller asked for the rebuilt keys
        two_tokens = dict(c, query_rope=c["query_rope"].expand(-1, -1, -1, 2, -1),
                          query_nope=c["query_nope"].expand(-1, -1, -1, 2, -1),
                          mask=c["mask"].expand(-1, -1, -1, 2, -1))
        attend(*[two_tokens[k] for k in ARGS])  # not a decode step
    assert len(kernel_calls) == 1
    monkeypatch.setenv("KVFORGE_KERNELS", "off")
    with torch.no_grad():
        attend(*args)
    assert len(kernel_calls) == 1


def test_auto_serves_the_kernel_on_a_gpu(monkeypatch, kernel_calls):
    """Under KVFORGE_KERNELS=auto the kernel serves whatever use_triton sends to Triton (CUDA tensors in bf16 /
    fp16), behind no further gate (session 24 found it behind one that only KVFORGE_KERNELS=triton opened, which
    left a plain generate() of an exported partial-RoPE model on the PyTorch path, 9-15x slower per layer)."""
    monkeypatch.setenv("KVFORGE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "use_triton", lambda tensor, float32_exact=False: True)  # as on a GPU
    attend = dispatch.fused_attention("partial", partial_rope_attention)
    c = case(seed=5)
    with torch.no_grad():
        attend(*[c[k] for k in ARGS])
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("cache_bits", [None, 8])
def test_generate_with_the_kernel_equals_generate_without(monkeypatch, cache_bits):
    """A tiny model with partial-RoPE layers (a global owner, a window layer, a kv_from reader), batch 2 with left
    padding, decoding past the window: the same tokens and logits with KVFORGE_KERNELS=triton and =off; with an
    8-bit cache the kernel is handed the int8 rotary keys and latents."""
    calls = record_kernel_calls(monkeypatch, "partial_rope_decode_attention", cache_arg=2)
    partial = {"kv_proj": "low_rank", "rope": "partial", "kv_rank": 12, "rope_dims": 4, "cache_bits": cache_bits}
    runs = generate_with_and_without_kernels(
        monkeypatch,
        [partial, {"kv_from": 0}, {**partial, "rope_dims": 6, "attention": "window", "window": 8, "sinks": 2}],
        num_attention_heads=6)
    assert len(calls) == 9 * 3  # 9 decode steps x 3 layers attending over a partial-RoPE cache
    assert set(calls.dtypes) == {torch.int8 if cache_bits else torch.float32}
    assert_same_generation(runs)



@pytest.mark.skipif("partial_shared" not in ATTENTION_FUNCTIONS,
                    reason="the shared-rotary layout (rope_shared) is not in this modeling file yet")
def test_generate_with_a_shared_rotary_key_equals_generate_without(monkeypatch):
    """DeepSeek MLA's layout (one rotary key for every head, Kr = 1) through its own representation name, its cache
    in 8 bits (the per-head layout's test covers both formats)."""
    calls = record_kernel_calls(monkeypatch, "partial_rope_decode_attention", cache_arg=2)
    runs = generate_with_and_without_kernels(
        monkeypatch, [{"kv_proj": "low_rank", "rope": "partial", "rope_shared": True, "kv_rank": 16, "rope_dims": 8,
                       "cache_bits": 8}, {}], num_attention_heads=4)
    assert len(calls) == 9 and set(calls.dtypes) == {torch.int8}  # 9 decode steps x 1 shared-rotary layer
    assert_same_generation(runs)


@pytest.mark.parametrize("rank, rope_dim, bits, cap", [(96, 32, 8, 128), (192, 32, 8, None), (96, 32, 16, None)])
def test_registers_are_capped_only_where_the_cap_was_timed(rank, rope_dim, bits, cap, monkeypatch):
    """An 8-bit cache with half products gets the 128-register cap and four programs an SM where its tiles are at
    most 128 latent and rotary columns wide (rank 96 beside 3 x 32, timed on an H200); a wider latent (192, which
    spills under the cap offline) or a 16-bit cache launches uncapped."""
    from kvforge.kernels import partial_rope_decode

    launches = []
    kernel_fn = partial_rope_decode._partial_rope_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel_fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(partial_rope_decode, "_partial_rope_decode_kernel", Spy())
    c = case(kv_heads=3, group=3, rope_dim=rope_dim, nope_dim=64 - rope_dim, rank=rank, slots=20,
             dtype=torch.float16 if bits == 8 else torch.float32, seed=4)
    scales = {}
    if bits == 8:
        (k_rope, scales["k_rope_scale"]), (kv_latent, scales["kv_latent_scale"]) = (
            quantize_slots(c["k_rope"], 2), quantize_slots(c["kv_latent"], 1))
        c = dict(c, k_rope=k_rope, kv_latent=kv_latent)
    kernel(c, block_s=16, splits=1, **scales)
    assert launches[0]["maxnreg"] == cap


def test_slot_splits_fill_whole_waves_on_a_gpu(monkeypatch):
    """The splits both decode kernels take, for an H200's 132 SMs (no GPU needed: only the count is read)."""
    from kvforge.kernels import latent_attention

    monkeypatch.setattr(latent_attention, "_multiprocessors", lambda device: 132)
    gpu = torch.device("cuda")
    # B=128 rows, one head block: four programs per SM held within is 4 splits (512 programs for 528 places);
    # reached, 8 per SM is 9 splits (1,152 programs: a third wave)
    assert latent_attention.slot_splits(128, 16384, 64, gpu, 4, whole_waves=True) == 4
    assert latent_attention.slot_splits(128, 16384, 64, gpu, 8) == 9
    assert latent_attention.slot_splits(64, 4096, 64, gpu, 4, whole_waves=True) == 8
    assert latent_attention.slot_splits(64, 1000, 64, gpu, 4, whole_waves=True) == 4  # no split under four tiles
    assert latent_attention.slot_splits(1024, 16384, 64, gpu, 4, whole_waves=True) == 1  # more rows than places
    assert latent_attention.slot_splits(1, 1 << 20, 64, gpu, 4, whole_waves=True) == 128  # the merge's cap
    assert latent_attention.slot_splits(128, 16384, 64, torch.device("cpu"), 4, whole_waves=True) == 1
