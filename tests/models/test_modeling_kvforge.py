"""KVForgeForCausalLM against references: Llama/Qwen2/Mistral logits where a spec is an identity, cached
generate() against repeated uncached forwards for every method and all combined, gradients, cache bytes.

Tiny fp32 models (hidden 64, 4 q heads, 2 kv heads, head_dim 16, vocab 128), seeded.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvforge.models.configuration_kvforge import KVForgeConfig
from kvforge.models.modeling_kvforge import (
    KVForgeCache,
    KVForgeForCausalLM,
    SlotLayout,
    dequantize_slots,
    fake_quantize,
    partial_rope_attention,
    partial_rope_dims,
    quantize_slots,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
TOL = 1e-4


# Tiny matmuls gain nothing from threads (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_base(kind: str = "llama", **overrides):
    torch.manual_seed(0)
    fields = {**TINY, **overrides}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**fields, initializer_range=0.1)).eval()
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**fields, initializer_range=0.1)).eval()
        with torch.no_grad():  # random init zeroes biases; make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
        return model
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**fields, sliding_window=None, initializer_range=0.1)).eval()
    raise ValueError(kind)


def kvforge_from(base, layers, **overrides) -> KVForgeForCausalLM:
    """A KVForge model with the base's config and every weight whose name and shape match copied over."""
    config = KVForgeConfig.from_base_config(base.config, {"layers": layers}, **overrides)
    model = KVForgeForCausalLM(config).eval()
    source = base.state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in source and source[name].shape == param.shape:
                param.copy_(source[name])
    return model


def attn(model, i):
    return model.model.layers[i].self_attn


def padded_batch(lengths=(7, 4), vocab=128, seed=1):
    """Left-padded input_ids / attention_mask / generate()'s position_ids."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def positions_from_mask(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def assert_same_logits(reference, model, ids, mask):
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        actual = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    diff = (expected[real] - actual[real]).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"


# ---------------------------------------------------------------------------------------------------
# Identity: specs that must reproduce the original model exactly
# ---------------------------------------------------------------------------------------------------

DENSE = [{}] * 4


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_dense_spec_reproduces_base_model(kind):
    base = tiny_base(kind)
    model = kvforge_from(base, DENSE)
    assert model.config.base_model_type == kind
    ids, mask = padded_batch()
    assert_same_logits(base, model, ids, mask)
    # and without padding, mask or positions
    with torch.no_grad():
        diff = (base(ids[:, 3:]).logits - model(ids[:, 3:]).logits).abs().max().item()
    assert diff <= TOL


def test_qwen2_biases_are_where_qwen2_has_them():
    model = kvforge_from(tiny_base("qwen2"), DENSE)
    layer = attn(model, 0)
    assert layer.q_proj.bias is not None and layer.k_proj.bias is not None and layer.v_proj.bias is not None
    assert layer.o_proj.bias is None


def test_tied_embeddings():
    base = tiny_base("llama", tie_word_embeddings=True)
    model = kvforge_from(base, DENSE)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_same_logits(base, model, *padded_batch())


def test_window_at_least_sequence_length_is_global():
    base = tiny_base()
    model = kvforge_from(base, [{}, {"attention": "window", "window": 7}, {}, {"attention": "window", "window": 9, "sinks": 2}])
    assert_same_logits(base, model, *padded_batch())


def test_window_smaller_than_sequence_changes_logits():
    base = tiny_base()
    model = kvforge_from(base, [{"attention": "window", "window": 3}] + [{}] * 3)
    ids, mask = padded_batch()
    with torch.no_grad():
        a = base(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        b = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    # the first 3 real tokens of each row see the same keys; later ones lose the start of the row
    assert (a[0, :3] - b[0, :3]).abs().max() <= TOL
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-3


def test_merged_heads_with_original_head_count():
    base = tiny_base()
    model = kvforge_from(base, [{"kv_proj": "merged_heads", "num_kv_heads": KV_HEADS}] * 4)
    assert_same_logits(base, model, *padded_batch())


def test_low_rank_pre_rope_latent_at_full_rank():
    base = tiny_base("qwen2")  # with k/v bias: it rides on the down-projection
    full = KV_HEADS * HEAD_DIM
    model = kvforge_from(base, [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": full, "v_rank": full}] * 4)
    with torch.no_grad():
        for i in range(4):
            original, layer = base.model.layers[i].self_attn, attn(model, i)
            for part in ("k", "v"):
                getattr(layer, f"{part}_down").weight.copy_(getattr(original, f"{part}_proj").weight)
                getattr(layer, f"{part}_down").bias.copy_(getattr(original, f"{part}_proj").bias)
                getattr(layer, f"{part}_up").weight.copy_(torch.eye(full))
    assert_same_logits(base, model, *padded_batch())


def partial_weights_from(original, layer, rope_pairs: torch.Tensor):
    """Full-rank partial-RoPE weights for the original k/v projection: k_rope = the rotary rows of W_k,
    kv_down = [non-rotary rows of W_k; W_v], k_up / v_up select them back."""
    rope_index = rope_pairs.expand(KV_HEADS, -1).clone()
    rope_dims, nope_dims = partial_rope_dims(rope_index, HEAD_DIM)
    rows = lambda dims: torch.cat([h * HEAD_DIM + dims[h] for h in range(KV_HEADS)])  # noqa: E731
    w_k, w_v = original.k_proj.weight, original.v_proj.weight
    nope = rows(nope_dims).numel()
    with torch.no_grad():
        layer.rope_index.copy_(rope_index)
        layer.k_rope.weight.copy_(w_k[rows(rope_dims)])
        layer.kv_down.weight.copy_(torch.cat([w_k[rows(nope_dims)], w_v]))
        eye = torch.eye(layer.kv_down.weight.shape[0])
        layer.k_up.weight.copy_(eye[:nope])
        layer.v_up.weight.copy_(eye[nope:])


def test_partial_rope_all_dims_rotary_at_full_rank():
    base = tiny_base()
    full = KV_HEADS * HEAD_DIM
    model = kvforge_from(base, [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": HEAD_DIM, "kv_rank": full}] * 4)
    for i in range(4):
        partial_weights_from(base.model.layers[i].self_attn, attn(model, i), torch.arange(HEAD_DIM // 2))
    assert_same_logits(base, model, *padded_batch())


def test_partial_rope_matches_llama_with_those_frequencies_switched_off():
    """Non-contiguous rotary pairs, full rank: equal to Llama whose other frequencies are zero (unrotated)."""
    base = tiny_base()
    pairs = torch.tensor([0, 3, 5])  # 6 rotary dims of 16
    nope_pairs = [i for i in range(HEAD_DIM // 2) if i not in pairs.tolist()]
    base.model.rotary_emb.inv_freq[nope_pairs] = 0.0
    rank = KV_HEADS * (HEAD_DIM - 6) + KV_HEADS * HEAD_DIM
    model = kvforge_from(base, [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 6, "kv_rank": rank}] * 4)
    for i in range(4):
        partial_weights_from(base.model.layers[i].self_attn, attn(model, i), pairs)
    assert_same_logits(base, model, *padded_batch())


def silence_layer(base, i):
    """Layer i computes attention but adds nothing to the residual stream, so layer i + 1 sees its input."""
    with torch.no_grad():
        base.model.layers[i].self_attn.o_proj.weight.zero_()
        base.model.layers[i].mlp.down_proj.weight.zero_()


def test_kv_from_reads_the_producer_cache():
    base = tiny_base()
    silence_layer(base, 1)
    with torch.no_grad():  # layer 2 computes exactly layer 1's K and V
        for name in ("k_proj", "v_proj"):
            getattr(base.model.layers[2].self_attn, name).weight.copy_(getattr(base.model.layers[1].self_attn, name).weight)
        base.model.layers[2].input_layernorm.weight.copy_(base.model.layers[1].input_layernorm.weight)
    model = kvforge_from(base, [{}, {}, {"kv_from": 1}, {}])
    assert not hasattr(attn(model, 2), "k_proj") and not hasattr(attn(model, 2), "v_proj")
    assert_same_logits(base, model, *padded_batch())


def test_probs_from_reuses_the_producer_probabilities():
    base = tiny_base()
    silence_layer(base, 1)
    with torch.no_grad():  # layer 2's q and k equal layer 1's, so its probabilities do too
        for name in ("q_proj", "k_proj"):
            getattr(base.model.layers[2].self_attn, name).weight.copy_(getattr(base.model.layers[1].self_attn, name).weight)
        base.model.layers[2].input_layernorm.weight.copy_(base.model.layers[1].input_layernorm.weight)
    model = kvforge_from(base, [{}, {}, {"probs_from": 1}, {}])
    layer = attn(model, 2)
    assert {name for name, _ in layer.named_children()} == {"v_proj", "o_proj"}
    assert_same_logits(base, model, *padded_batch())


def test_absorbed_partial_attention_equals_expanded():
    torch.manual_seed(0)
    batch, kv_heads, group, length, slots, rope, nope, rank = 2, 2, 2, 3, 9, 4, 12, 10
    q_rope, q_nope = torch.randn(batch, kv_heads, group, length, rope), torch.randn(batch, kv_heads, group, length, nope)
    k_rope, latent = torch.randn(batch, kv_heads, slots, rope), torch.randn(batch, slots, rank)
    k_up, v_up = torch.nn.Linear(rank, kv_heads * nope, bias=False), torch.nn.Linear(rank, kv_heads * HEAD_DIM)
    mask = torch.rand(batch, 1, 1, length, slots) > 0.3
    mask[..., 0] = True
    args = (q_rope, q_nope, k_rope, latent, k_up, v_up, mask, 0.25)
    expanded = partial_rope_attention(*args, need_probs=True, absorb=False)
    absorbed = partial_rope_attention(*args, need_probs=True, absorb=True)
    torch.testing.assert_close(absorbed[0], expanded[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(absorbed[1], expanded[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Cached generate() == repeated uncached forwards
# ---------------------------------------------------------------------------------------------------

WINDOW = dict(attention="window", window=5, sinks=2)
METHODS = {
    "dense": [{}] * 4,
    "window": [WINDOW, {"attention": "window", "window": 4}, {}, WINDOW],
    "merged_heads": [{"kv_proj": "merged_heads", "num_kv_heads": 1}] * 4,
    "pre_rope_latent": [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 8, "v_rank": 12}] * 4,
    "partial": [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 6, "kv_rank": 12}] * 4,
    "kv_from": [{}, {"kv_from": 0}, WINDOW, {**WINDOW, "kv_from": 2}],
    "probs_from": [{}, {"probs_from": 0}, {"kv_proj": "merged_heads", "num_kv_heads": 1},
                   {"probs_from": 2, "kv_proj": "low_rank", "v_rank": 6}],
}
COMBINED = [
    {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20},
    {"kv_from": 0},
    {**WINDOW, "kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10},
    {**WINDOW, "probs_from": 2, "kv_proj": "low_rank", "v_rank": 8},
    {**WINDOW, "kv_from": 2},
    {"kv_proj": "merged_heads", "num_kv_heads": 1},
    {"probs_from": 1},
    {"attention": "window", "window": 3, "kv_proj": "merged_heads", "num_kv_heads": 1},
]
METHODS["combined"] = COMBINED
METHODS["combined_with_bias"] = COMBINED  # built with attention_bias (Qwen2-like k/v down-projection biases)
# DeepSeek-style MLA: one rotary key for every head, an RMS-normed joint latent; beside dense, window and pre-RoPE
# layers, with and without biases (q_rope, kv_down and k_rope carry one then)
SHARED_ROPE = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 6, "kv_rank": 12, "rope_shared": True}
METHODS["partial_shared"] = [SHARED_ROPE, {**WINDOW, **SHARED_ROPE}, {}, SHARED_ROPE]
METHODS["partial_shared_with_bias"] = [SHARED_ROPE, METHODS["pre_rope_latent"][0], {**WINDOW, **SHARED_ROPE}]
# An 8-bit cache on every representation that stores something, beside 16-bit layers: kv_from readers of an 8-bit
# producer (global and window ring), an 8-bit value latent reading a 16-bit layer's probabilities.
INT8 = {"cache_bits": 8}
METHODS["int8"] = [
    {**INT8, "kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10},
    {"kv_from": 0},
    {**WINDOW, **INT8},
    {**WINDOW, "kv_from": 2},
    {**INT8, "kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20},
    {**INT8, "probs_from": 4, "kv_proj": "low_rank", "v_rank": 8},
    {**INT8, "kv_proj": "merged_heads", "num_kv_heads": 1},
    {**INT8, **SHARED_ROPE},
]
# 4-bit caches (two values per byte) on every representation that stores something, beside 8- and 16-bit layers.
INT4 = {"cache_bits": 4}
METHODS["int4"] = [
    {**INT4, "kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10},
    {"kv_from": 0},
    {**WINDOW, **INT4},
    {**INT8, "kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 7, "v_rank": 9},
    {**INT4, "kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": 20},
    {**INT4, "probs_from": 4, "kv_proj": "low_rank", "v_rank": 8},
    {**INT4, "kv_proj": "merged_heads", "num_kv_heads": 1},
    {},
    {**INT4, **SHARED_ROPE},
]


def build(layers, attn_implementation="sdpa", seed=0, **overrides) -> KVForgeForCausalLM:
    torch.manual_seed(seed)
    fields = {**TINY, "num_hidden_layers": len(layers), **overrides}
    config = KVForgeConfig(**fields, initializer_range=0.1, eos_token_id=None, pad_token_id=0,
                           compression={"layers": layers})
    model = KVForgeForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():  # init zeroes biases; make them matter
            if name.endswith("bias"):
                param.normal_(0, 0.1)
        for module in model.modules():  # partial layers: a per-head, non-contiguous rotary choice
            if hasattr(module, "rope_index"):
                pairs = module.rope_index.shape[1]
                module.rope_index.copy_(torch.stack([torch.randperm(HEAD_DIM // 2)[:pairs].sort().values
                                                     for _ in range(module.rope_index.shape[0])]))
    return model


def uncached_logits(model, sequences, mask, prompt_width, steps):
    """The next-token logits at each generation step from a full forward pass without a cache."""
    out = []
    with torch.no_grad():
        for step in range(steps):
            width = prompt_width + step
            full_mask = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], dim=1)
            logits = model(sequences[:, :width], attention_mask=full_mask,
                           position_ids=positions_from_mask(full_mask), use_cache=False).logits
            out.append(logits[:, -1])
    return out


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_greedy_generate_matches_uncached_forwards(method, padding):
    """Without padding the prefill shares one mask row across the batch (or SDPA's is_causal), as would the
    uncached forwards: their reference then gets one padding column in front, so it attends under per-row masks."""
    model = build(METHODS[method], attn_implementation="eager" if method == "combined" else "sdpa",
                  attention_bias=method.endswith("_with_bias"))
    # 7-token prompt + 12 > window + sinks; 11 tokens wrap the window-5 + 2-sink rings within the prefill
    ids, mask = padded_batch() if padding == "left" else padded_batch(lengths=(11, 11))
    new_tokens = 12
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, KVForgeCache)
    assert out.sequences.shape == (2, ids.shape[1] + new_tokens)
    if padding == "left":
        reference = uncached_logits(model, out.sequences, mask, ids.shape[1], new_tokens)
    else:
        pad = torch.zeros(2, 1, dtype=torch.long)
        reference = uncached_logits(model, torch.cat([pad, out.sequences], dim=1), torch.cat([pad, mask], dim=1),
                                    ids.shape[1] + 1, new_tokens)
    for step, (cached, full) in enumerate(zip(out.logits, reference)):
        diff = (cached - full).abs().max().item()
        assert diff <= TOL, f"{method}, {padding} padding: step {step} logits differ by {diff}"
        assert torch.equal(out.sequences[:, ids.shape[1] + step], full.argmax(-1))


@pytest.mark.parametrize("method", ["window", "combined"])
def test_seeded_sampling_matches_uncached_sampling(method):
    model = build(METHODS[method])
    ids, mask = padded_batch()
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0,
                                       temperature=1.0, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1]), "same seed, different samples"
    assert torch.equal(runs[0], runs[2]), "cached and uncached sampling diverged"


@pytest.mark.parametrize("method", ["combined", "int8", "int4"])
def test_beam_search_reorders_the_cache(method):
    model = build(METHODS[method])
    ids, mask = padded_batch()
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                                  use_cache=False)
    assert torch.equal(cached, uncached)


def test_chunked_prefill_and_decode_match_one_pass():
    """Feeding a sequence in uneven chunks through the cache equals one forward (ring wrap inside a chunk)."""
    model = build(COMBINED)
    ids, mask = padded_batch(lengths=(15, 11), seed=3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False).logits
        cache, pieces, start = KVForgeCache(model.config), [], 0
        for size in (6, 1, 5, 1, 2):
            end = start + size
            pieces.append(model(ids[:, start:end], attention_mask=mask[:, :end],
                                position_ids=positions_from_mask(mask)[:, start:end], past_key_values=cache,
                                use_cache=True).logits)
            start = end
    chunked = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (chunked[real] - full[real]).abs().max() <= TOL


def record_plans(monkeypatch) -> list:
    """Patches SlotLayout.plan to record (is_ring, plan) for every plan made from then on."""
    plans = []
    plan = SlotLayout.plan

    def recorded(self, *args, **kwargs):
        made = plan(self, *args, **kwargs)
        plans.append((self.is_ring, made))
        return made

    monkeypatch.setattr(SlotLayout, "plan", recorded)
    return plans


@pytest.mark.parametrize("method", ["combined", "int8", "int4"])
@pytest.mark.parametrize("static", [False, True])
def test_chunked_prefill_without_padding_shares_one_mask_row_and_matches_one_pass(method, static, monkeypatch):
    """Chunks of a prompt with no padding: every later chunk of a global layout attends under one mask row for the
    batch ([1, 1, 1, T, S], not [B, ...]: 128 MiB per row for 4,096 new tokens over 32k), offset so that chunk
    token t sees the cache and its own first t tokens (SDPA's is_causal would align the corner top left), and the
    logits are one forward's; with padding the rows keep their own masks."""
    plans = record_plans(monkeypatch)
    model = build(METHODS[method])
    ids = torch.randint(1, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, pieces, start = KVForgeCache(model.config, static=static, max_cache_len=16), [], 0
        plans.clear()
        for size in (6, 5, 1, 4):
            end = start + size
            pieces.append(model(ids[:, start:end], attention_mask=torch.ones(3, end, dtype=torch.long),
                                past_key_values=cache, use_cache=True).logits)
            start = end
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL
    later = [p for ring, p in plans if not ring and p.cached_slots > 0 and p.query_index.shape[1] > 1]
    assert later and all(p.mask.shape[0] == 1 and p.sdpa_mask() == (p.mask, False) for p in later)
    # A padded batch's later chunks: one mask per row.
    ids, mask = padded_batch(lengths=(12, 9), seed=4)
    plans.clear()
    with torch.no_grad():
        cache = KVForgeCache(model.config)
        for start, end in ((0, 7), (7, 12)):
            model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions_from_mask(mask)[:, start:end],
                  past_key_values=cache, use_cache=True)
    later = [p for ring, p in plans if not ring and p.cached_slots > 0]
    assert later and all(p.mask.shape[0] == 2 for p in later)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["combined", "partial_shared_with_bias", "int8", "int4"])
def test_gradients_reach_every_parameter(method):
    model = build(METHODS[method], attention_bias=method.endswith("_with_bias")).train()
    ids, mask = padded_batch(lengths=(9, 9))
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients(every):
    """Checkpointing every layer, or one in `every` (the trainer's training.gradient_checkpointing_every): the
    checkpointed layers run their attention again in the backward, the others once, and the gradients are those
    without checkpointing."""
    from kvforge.trainer.stages import checkpoint_layers

    ids, _ = padded_batch(lengths=(9, 9))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = build(COMBINED, attn_implementation="eager").train()
        if checkpointing:
            assert checkpoint_layers(model, every) == list(range(0, len(model.model.layers), every))
        counts = [0] * len(model.model.layers)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
        model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        calls.append(counts)
    assert calls[0] == [1] * len(calls[0])
    assert calls[1] == [2 if index % every == 0 else 1 for index in range(len(calls[1]))]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------
# Cache memory
# ---------------------------------------------------------------------------------------------------


def expected_cache_shapes(layer: dict, batch: int, tokens: int):
    shapes = expected_value_shapes(layer, batch, tokens)
    if layer.get("cache_bits") == 4:  # two values per byte along the last dim
        shapes = {name: shape[:-1] + (shape[-1] // 2,) for name, shape in shapes.items()}
    if layer.get("cache_bits") is not None:  # one scale per row, token and tensor: [B, C, 1], [B, 1, C, 1]
        shapes.update({f"{name}_scale": (batch, shape[1], 1) if len(shape) == 3 else (batch, 1, shape[2], 1)
                       for name, shape in list(shapes.items())})
    return shapes


def expected_value_shapes(layer: dict, batch: int, tokens: int):
    slots = min(tokens, layer["window"] + layer.get("sinks", 0)) if layer.get("attention") == "window" else tokens
    heads = layer.get("num_kv_heads", KV_HEADS)
    if layer.get("kv_from") is not None:
        return {}
    if layer.get("probs_from") is not None:
        if layer.get("kv_proj") == "low_rank":
            return {"v_latent": (batch, slots, layer["v_rank"])}
        return {"value": (batch, heads, slots, HEAD_DIM)}
    if layer.get("kv_proj") == "low_rank" and layer["rope"] == "pre_rope_latent":
        return {"k_latent": (batch, slots, layer["k_rank"]), "v_latent": (batch, slots, layer["v_rank"])}
    if layer.get("kv_proj") == "low_rank":
        rope_heads = 1 if layer.get("rope_shared") else KV_HEADS  # one rotary key for all heads, or one per kv head
        return {"kv_latent": (batch, slots, layer["kv_rank"]), "k_rope": (batch, rope_heads, slots, layer["rope_dims"])}
    return {"key": (batch, heads, slots, HEAD_DIM), "value": (batch, heads, slots, HEAD_DIM)}


@pytest.mark.parametrize("method", ["dense", "combined", "partial_shared", "int8", "int4"])
def test_cache_allocates_what_the_spec_says(method):
    layers = METHODS[method]
    model = build(layers)
    ids, mask = padded_batch()
    new_tokens = 12
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    held = ids.shape[1] + new_tokens - 1  # the last sampled token is never fed back
    assert cache.get_seq_length() == held
    found = {}
    for idx, name, tensor in cache.named_tensors():
        found.setdefault(idx, {})[name] = tuple(tensor.shape)
    for idx, layer in enumerate(layers):
        assert found.get(idx, {}) == expected_cache_shapes(layer, 2, held), f"layer {idx}"
    expected_bytes = model.config.kv_cache_bytes(held, dtype=torch.float32, batch_size=2)
    assert cache.cache_bytes() == expected_bytes
    assert cache.kv_bytes_per_token() == pytest.approx(expected_bytes / (2 * held))
    if method == "int8":
        dtypes = {name: t.dtype for _, name, t in cache.named_tensors()}
        assert dtypes["k_latent"] == dtypes["key"] == torch.int8
        assert dtypes["k_latent_scale"] == dtypes["key_scale"] == torch.float32
    if method == "int4":
        dtypes = {(idx, name): t.dtype for idx, name, t in cache.named_tensors()}
        assert dtypes[(0, "k_latent")] == dtypes[(2, "key")] == dtypes[(4, "kv_latent")] == torch.uint8
        assert dtypes[(3, "k_latent")] == torch.int8 and dtypes[(7, "key")] == torch.float32
    if method == "combined":  # the point of it all
        dense_bytes = KVForgeConfig(**{**TINY, "num_hidden_layers": len(layers)}).kv_cache_bytes(
            held, dtype=torch.float32, batch_size=2)
        assert cache.cache_bytes() < 0.5 * dense_bytes


def unpacked_levels(values: torch.Tensor) -> torch.Tensor:
    """The integer levels a low-bit cache stores, unpacked by plain arithmetic (independent of dequantize_slots)."""
    if values.dtype == torch.int8:
        return values.long()
    low, high = values.long() % 16, values.long() // 16
    low, high = low - 16 * (low > 7), high - 16 * (high > 7)  # two's complement nibbles
    return torch.stack([low, high], dim=-1).flatten(-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_bit_slots_round_to_half_a_step_of_their_own_scale(dtype, bits):
    top = 2 ** (bits - 1) - 1
    latent = torch.randn(2, 7, 24, dtype=torch.float64).mul(torch.logspace(-3, 2, 7)[None, :, None]).to(dtype)
    latent[1, 3] = 0  # an all-zero slot stays zero (no 0/0)
    heads = torch.randn(2, 3, 7, 16, dtype=dtype)  # [B, K, C, D]: one scale per row and slot over every head
    for x, slot_dim, scale_shape in ((latent, 1, (2, 7, 1)), (heads, 2, (2, 1, 7, 1))):
        values, scale = quantize_slots(x, slot_dim, bits)
        assert scale.dtype == dtype and scale.shape == scale_shape
        assert values.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert values.shape == x.shape[:-1] + (x.shape[-1] * bits // 8,)  # 4 bits: two values per byte
        levels = unpacked_levels(values)
        assert levels.abs().max() == top and levels.shape == x.shape
        dequantized = dequantize_slots(values, scale)
        torch.testing.assert_close(dequantized, (levels * scale.double()).to(dtype), rtol=0, atol=0)
        error = (dequantized.double() - x.double()).abs()
        # half a step, plus the rounding of the product to x's dtype (bf16 keeps 8 significant bits)
        assert (error <= scale.double() / 2 + x.double().abs() * torch.finfo(dtype).eps).all()
        assert torch.equal(fake_quantize(x, slot_dim, bits), dequantized)  # training sees what the cache serves
    assert torch.equal(dequantize_slots(*quantize_slots(latent, 1, bits))[1, 3], torch.zeros(24, dtype=latent.dtype))
    # straight-through: the gradient of the identity
    x = latent.float().requires_grad_()
    fake_quantize(x, 1, bits).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_an_8_bit_cache_changes_the_model_only_by_its_rounding():
    """The same weights with and without cache_bits: close logits, not equal ones (the rounding is applied)."""
    ids, mask = padded_batch()
    logits = {}
    for bits in (None, 8, 4):
        layers = [{**layer, "cache_bits": bits} if layer.get("kv_from") is None else layer for layer in COMBINED]
        with torch.no_grad():
            logits[bits] = build(layers)(ids, attention_mask=mask, use_cache=False).logits
    diff = {bits: (logits[bits] - logits[None]).abs().max().item() for bits in (8, 4)}
    assert 0 < diff[8] < diff[4] < 0.3 * logits[None].abs().max().item()  # 4 bits round 18x coarser


def test_cache_grows_in_chunks_without_a_length_hint():
    model = build(METHODS["window"])
    ids, mask = padded_batch()
    cache = KVForgeCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    shapes = {(idx, name): tuple(t.shape) for idx, name, t in cache.named_tensors()}
    assert shapes[(2, "key")] == (2, KV_HEADS, 256, HEAD_DIM)  # global: one chunk
    assert shapes[(0, "key")] == (2, KV_HEADS, 7, HEAD_DIM)  # ring: window + sinks
    assert shapes[(1, "key")] == (2, KV_HEADS, 4, HEAD_DIM)


def test_generate_rejects_a_foreign_cache():
    from transformers import DynamicCache

    model = build(DENSE)
    ids, mask = padded_batch()
    with pytest.raises(TypeError, match="KVForgeCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=DynamicCache())


def test_crop_then_continue_matches_uncached():
    """Global-only caches can be cropped (assisted decoding); window rings refuse, naming the window."""
    model = build(METHODS["pre_rope_latent"])
    ids, mask = padded_batch(lengths=(10, 8))
    cache = KVForgeCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), past_key_values=cache, use_cache=True)
        cache.crop(-3)
        assert cache.get_seq_length() == 7
        tail = model(ids[:, 7:], attention_mask=mask, position_ids=positions_from_mask(mask)[:, 7:],
                     past_key_values=cache, use_cache=True).logits
        full = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False).logits
    assert (tail - full[:, 7:]).abs().max() <= TOL

    window_cache = KVForgeCache(build(METHODS["window"]).config)
    window_cache._seq_length = 5
    with pytest.raises(ValueError, match=r"cannot crop a cache with window layers \(window=\[4, 5\]\)"):
        window_cache.crop(-1)


def test_bfloat16_generate_runs_and_caches_in_bfloat16():
    model = build(COMBINED).to(torch.bfloat16)
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert {t.dtype for _, _, t in cache.named_tensors()} == {torch.bfloat16}
    assert cache.cache_bytes() == model.config.kv_cache_bytes(cache.get_seq_length(), dtype=torch.bfloat16, batch_size=2)


def test_hidden_states_and_attentions_outputs():
    model = build(COMBINED, attn_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, use_cache=False)
    assert len(out.hidden_states) == len(COMBINED) + 1
    for layer, probs in zip(COMBINED, out.attentions):
        if layer.get("probs_from") is not None:
            assert probs is None  # it has no probabilities of its own
        else:
            assert probs.shape == (2, HEADS, ids.shape[1], ids.shape[1])
            torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, ids.shape[1]))


def test_eager_and_sdpa_agree():
    model = build(COMBINED, attn_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        sdpa = model(ids, attention_mask=mask, use_cache=False).logits
    assert (eager - sdpa)[mask.bool()].abs().max() <= TOL


ZERO3_SCRIPT = """
import copy, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
sys.path.insert(0, sys.argv[2])
from test_modeling_kvforge import COMBINED, build, padded_batch
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
model = build(COMBINED, attn_implementation="eager").train()
reference = copy.deepcopy(model)
ids, _ = padded_batch(lengths=(9, 9))
reference(ids, labels=ids).loss.backward()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.backward(engine(ids, labels=ids).loss)
for (name, param), (_, ref) in zip(engine.module.named_parameters(), reference.named_parameters()):
    diff = (safe_get_full_grad(param) - ref.grad).abs().max().item()
    assert diff < 1e-5, (name, diff)
print("ok")
"""


@pytest.mark.distributed
def test_zero3_with_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """ZeRO-3 partitions every weight: consumers that attend over their producer's latent (and reuse its
    probabilities) under gradient checkpointing must still get exactly the plain-PyTorch gradients."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(port), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_lora_wrapped_up_projections_stay_exact_at_decode():
    """Absorbed decode reads .weight; a LoRA-wrapped projection must be called instead (adapter included)."""
    from peft import LoraConfig, get_peft_model

    model = build(COMBINED)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["k_up", "v_up", "q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # initialized to zero; give the adapters an effect
                param.normal_(0, 0.5)
    model.eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    reference = uncached_logits(model, out.sequences, mask, ids.shape[1], 4)
    for cached, full in zip(out.logits, reference):
        assert (cached - full).abs().max() <= TOL


@pytest.mark.real_model
def test_smollm2_dense_identity_and_measured_bytes_per_token(smollm2_dir):
    """The real SmolLM2-135M as an all-dense KVForge model: Llama's logits, and a real generate() whose cache
    measures the 30 x 2 x 3 x 64 x 2 = 23,040 bf16 bytes per token of docs/ARCHITECTURE.md."""
    base = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model = kvforge_from(base, [{}] * base.config.num_hidden_layers)
    ids, mask = padded_batch(lengths=(12, 7), vocab=base.config.vocab_size)
    assert_same_logits(base, model, ids, mask)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert out.past_key_values.kv_bytes_per_token() == 23040
    assert model.config.kv_cache_bytes_per_token(torch.bfloat16) == 23040
