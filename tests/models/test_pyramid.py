"""PyramidKV: the budget schedule, scoring and selection against references, and a compacted cache that
decodes exactly like attention restricted to the kept tokens -- with memory really freed.

Tiny fp32 KVForge models (hidden 64, 4 query heads, head_dim 16, vocab 128), seeded.
"""

import math

import pytest
import torch

from kvforge.models.configuration_kvforge import KVForgeConfig, LayerSpec
from kvforge.models.modeling_kvforge import KVForgeCache, KVForgeForCausalLM
from kvforge.models.pyramid import (
    PyramidError,
    PyramidSettings,
    cache_groups,
    layer_budgets,
    new_pyramid_cache,
    pool_scores,
    select_tokens,
)

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, vocab_size=128,
            max_position_embeddings=512)
LOW_RANK = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10}


# Tiny matmuls gain nothing from threads (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_model(layers, kv_heads=2, seed=0) -> KVForgeForCausalLM:
    torch.manual_seed(seed)
    config = KVForgeConfig(**TINY, num_hidden_layers=len(layers), num_key_value_heads=kv_heads,
                           initializer_range=0.1, compression={"layers": layers})
    return KVForgeForCausalLM(config).eval()


def prompt(length, seed=1, batch=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("budget,layers", [(64, 6), (40, 30), (100, 7), (13, 2)])
def test_pyramid_budgets_are_arithmetic_decreasing_with_the_exact_mean(budget, layers):
    s = PyramidSettings(budget=budget, window=8, sinks=4, beta=20)
    budgets = layer_budgets(s, layers)
    assert sum(budgets) == budget * layers  # average == the budget, exactly
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[0] > budgets[-1]
    selectable = budget - 12
    top, bottom = selectable / 20, 2 * selectable - selectable / 20  # the paper's top and bottom layers
    assert abs(budgets[-1] - 12 - top) <= 1 and abs(budgets[0] - 12 - bottom) <= 1
    steps = [a - b for a, b in zip(budgets, budgets[1:])]
    assert max(steps) - min(steps) <= 1  # arithmetic up to integer rounding
    assert min(budgets) >= 12  # every layer keeps its sinks and window


def test_uniform_budgets_and_beta_one_are_flat_with_the_same_total():
    uniform = layer_budgets(PyramidSettings(budget=64, schedule="uniform"), 5)
    assert uniform == [64] * 5
    assert layer_budgets(PyramidSettings(budget=64, beta=1), 5) == [64] * 5
    assert sum(layer_budgets(PyramidSettings(budget=64), 5)) == sum(uniform)


@pytest.mark.parametrize("values,message", [
    ({"budget": 10, "window": 8, "sinks": 4}, "pyramid.budget=10 is smaller than window + sinks = 8 + 4"),
    ({"budget": 64, "schedule": "pyramidal"}, "pyramid.schedule='pyramidal': expected one of pyramid, uniform"),
    ({"budget": 64, "pooling": "mean"}, "pyramid.pooling='mean'"),
    ({"budget": 64, "kernel_size": 4}, "pyramid.kernel_size=4: expected an odd size"),
    ({"budget": 64, "beta": 0.5}, "pyramid.beta=0.5: expected a number >= 1"),
    ({"budget": 64, "windw": 8}, "unknown key(s) ['windw']"),
    ({"schedule": "uniform"}, "pyramid.budget is missing (average tokens kept per layer)"),
    ({"budget": 0}, "pyramid.budget=0: expected an integer >= 1"),
])
def test_bad_settings_name_the_field(values, message):
    with pytest.raises(PyramidError) as err:
        PyramidSettings.from_any(values)
    assert message in str(err.value)


def test_settings_come_from_the_config_spec_with_overrides():
    config = KVForgeConfig(**TINY, num_hidden_layers=2, num_key_value_heads=2, compression={
        "layers": [{}, {}], "inference": {"pyramid": {"budget": 48, "schedule": "uniform", "window": 4}}})
    s = PyramidSettings.from_any(config.compression_spec.pyramid, schedule="pyramid", kernel_size=None)
    assert (s.budget, s.schedule, s.window, s.kernel_size) == (48, "pyramid", 4, 7)


# ---------------------------------------------------------------------------------------------------
# Scores and selection


def test_pooling_smooths_along_the_sequence():
    x = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 6.0]])
    assert torch.allclose(pool_scores(x, "avgpool", 3), torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0, 3.0]]))
    assert torch.equal(pool_scores(x, "maxpool", 3), torch.tensor([[0.0, 3.0, 3.0, 3.0, 6.0, 6.0]]))
    assert torch.equal(pool_scores(x, "none", 3), x)


def test_selection_keeps_sinks_window_and_the_top_scores_in_token_order():
    key_index = torch.arange(20)[None]  # one row, 20 real tokens
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, [5, 9, 12]] = torch.tensor([3.0, 2.0, 1.0])  # head 0 prefers 5 > 9 > 12
    scores[0, 1, [7, 13, 3]] = torch.tensor([3.0, 2.0, 1.0])  # head 1 prefers 7 > 13 > 3
    scores[:, :, 0] = -1.0  # a sink with a low score is kept regardless
    kept = select_tokens(scores, key_index, keep=2 + 3 + 2, window=3, sinks=2)
    assert kept[0, 0].tolist() == [0, 1, 5, 9, 17, 18, 19]
    assert kept[0, 1].tolist() == [0, 1, 7, 13, 17, 18, 19]


def test_selection_never_takes_padding_unless_a_row_is_too_short():
    # Row 0: 10 real tokens after 6 padding slots; row 1: 16 real tokens. Keep 12 per row.
    key_index = torch.stack([torch.cat([torch.full((6,), -1), torch.arange(10)]), torch.arange(16)])
    scores = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(0))
    scores[0, :, :6] = 100.0  # padding scored high must still lose to real tokens
    kept = select_tokens(scores, key_index, keep=12, window=2, sinks=1)
    tokens = key_index[:, None, :].expand(2, 3, 16).gather(-1, kept)
    assert (tokens[0, :, :2] == -1).all() and (tokens[0, :, 2:] >= 0).all()  # padding first, 2 of it, every head
    assert tokens[0, 0, 2:].tolist() == list(range(10))
    assert (tokens[1] >= 0).all() and (tokens[1, :, 0] == 0).all()
    assert (tokens[1, :, -2:] == torch.tensor([14, 15])).all()


def test_cache_groups_follow_sharing_and_skip_window_layers():
    layers = [LayerSpec(), LayerSpec(kv_from=0), LayerSpec(attention="window", window=8),
              LayerSpec(probs_from=0), LayerSpec(kv_proj="low_rank", rope="pre_rope_latent", k_rank=4, v_rank=4),
              LayerSpec(kv_from=4), LayerSpec()]
    groups = {g.owner: g for g in cache_groups(layers)}
    assert sorted(groups) == [0, 4, 6]  # layer 2 slides: its ring is bounded already
    assert groups[0].observers == [0, 1] and groups[0].members == [0, 3] and not groups[0].per_head  # probs consumer
    assert groups[4].observers == [4, 5] and groups[4].members == [4] and not groups[4].per_head  # latent: per row
    assert groups[6].observers == [6] and groups[6].members == [6] and groups[6].per_head


# ---------------------------------------------------------------------------------------------------
# The compacted cache in generate()


def test_a_budget_covering_the_prompt_changes_nothing():
    model = tiny_model([{}, {}, {}])
    ids = prompt(40)
    reference = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = new_pyramid_cache(model, budget=40, schedule="uniform")
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache), reference)
    assert cache.pyramid.compacted and cache.pyramid.kept == {}  # scored, nothing dropped


@pytest.mark.parametrize("layers,kv_heads", [([{}], 1), ([LOW_RANK], 2), ([{**LOW_RANK, "cache_bits": 8}], 2),
                                              ([{**LOW_RANK, "cache_bits": 4}], 2)],
                         ids=["dense", "pre_rope_latent", "int8_latent", "int4_latent"])
def test_compacted_decode_equals_attention_over_the_kept_tokens(layers, kv_heads):
    """With one layer, a token's cache entry depends only on the token and its position, so the compacted
    cache must equal the cache of a prompt made of just the kept tokens at their original positions."""
    model = tiny_model(layers, kv_heads=kv_heads)
    ids = prompt(60)
    cache = new_pyramid_cache(model, budget=20, window=4, sinks=2, schedule="uniform", max_cache_len=61)
    first = model(ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    layout = cache.layouts[("pyramid", 0)]
    kept, positions = layout.token_index[0, :layout.length], layout.positions[0, :layout.length]
    assert len(kept) == 20 and kept[:2].tolist() == [0, 1] and kept[-4:].tolist() == [56, 57, 58, 59]
    step = model(first, cache=cache, use_cache=True, attention_mask=torch.ones(1, 61, dtype=torch.long))
    reference = model(torch.cat([ids[:, kept], first], 1),
                      position_ids=torch.cat([positions, torch.tensor([60])])[None], use_cache=False)
    torch.testing.assert_close(step.logits[0, -1], reference.logits[0, -1], atol=1e-5, rtol=1e-5)


def test_selection_follows_the_window_attention_of_each_kv_head():
    """Per (batch, KV head): the kept tokens are the top of the last-window queries' attention summed over
    the query heads of that KV head -- computed here from the model's own attention probabilities."""
    model = tiny_model([{}], kv_heads=2)
    ids = prompt(50, seed=3)
    with torch.no_grad():
        probs = model(ids, output_attentions=True, use_cache=False).attentions[0]  # [B, H, T, S]
    window, sinks, keep = 4, 2, 16
    scores = probs[:, :, -window:].sum(2).view(1, 2, 2, 50).sum(2)  # [B, K, S]: heads 0,1 -> kv 0; 2,3 -> kv 1
    cache = new_pyramid_cache(model, budget=keep, window=window, sinks=sinks, pooling="none",
                              schedule="uniform")
    model(ids, cache=cache, use_cache=True)
    key = cache.layers[0].tensors["key"]  # [B, K, C, D]
    for head in range(2):
        top = scores[0, head, sinks:50 - window].topk(keep - window - sinks).indices + sinks
        expected = sorted([0, 1] + top.tolist() + list(range(46, 50)))
        full = KVForgeCache(model.config)
        model(ids, cache=full, use_cache=True)
        torch.testing.assert_close(key[0, head, :keep], full.layers[0].tensors["key"][0, head, expected])
    assert not torch.equal(key[0, 0, :keep], key[0, 1, :keep])  # the heads chose differently


def test_memory_is_freed_per_layer_as_the_schedule_says():
    model = tiny_model([{}, {}, {}, {}])
    ids = prompt(120)
    new_tokens = 6
    cache = new_pyramid_cache(model, budget=40, window=8, sinks=4, max_cache_len=120 + new_tokens)
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=cache)
    budgets = layer_budgets(PyramidSettings(budget=40), 4)
    per_token = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head_dim 16, fp32
    for layer, budget in enumerate(budgets):
        tensors = cache.layers[layer].tensors
        assert tensors["key"].shape == (1, 2, budget + new_tokens, 16)  # smaller tensors, not a mask
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == (budget + new_tokens) * per_token
    assert cache.cache_bytes() == (sum(budgets) + 4 * new_tokens) * per_token
    full = KVForgeCache(model.config, max_cache_len=120 + new_tokens)
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=full)
    assert full.cache_bytes() == 4 * (120 + new_tokens) * per_token
    assert cache.get_seq_length() == full.get_seq_length() == 120 + new_tokens - 1  # positions keep counting


def test_shared_caches_compact_once_for_their_readers():
    """kv_from readers score the producer's slots with it; a probs_from reader's values follow them."""
    model = tiny_model([{}, {"kv_from": 0}, {"probs_from": 0}, {"attention": "window", "window": 8, "sinks": 2},
                        LOW_RANK, {"kv_from": 4}])
    ids = prompt(64)
    cache = new_pyramid_cache(model, budget=24, window=4, sinks=2, schedule="uniform", max_cache_len=70)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    assert out.shape == (1, 70)
    assert cache.pyramid.kept == {0: 24, 4: 24}
    assert cache.layers[0].tensors["key"].shape[2] == cache.layers[2].tensors["value"].shape[2] == 24 + 6
    assert cache.layers[4].tensors["k_latent"].shape[1] == 24 + 6
    assert cache.layers[3].tensors["key"].shape[2] == 8 + 2  # the window layer's ring is untouched
    assert cache.layers[1].tensors == {} and cache.layers[5].tensors == {}


def test_left_padded_batch_selects_per_row_as_each_row_alone():
    model = tiny_model([{}, {}])
    rows = [prompt(50, seed=5)[0], prompt(36, seed=6)[0]]
    ids = torch.zeros(2, 50, dtype=torch.long)
    mask = torch.zeros(2, 50, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 50 - len(row):], mask[i, 50 - len(row):] = row, 1
    settings = dict(budget=20, window=4, sinks=2, pooling="none", schedule="uniform")
    batch_cache = new_pyramid_cache(model, **settings)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=batch_cache)
    for i, row in enumerate(rows):
        alone = new_pyramid_cache(model, **settings)
        model.generate(row[None], max_new_tokens=3, do_sample=False, cache=alone)
        for layer in (0, 1):
            batch_layout, alone_layout = batch_cache.layers[layer].layout, alone.layers[layer].layout
            assert torch.equal(batch_layout.token_index[i, :20], alone_layout.token_index[0, :20])


def test_a_pyramid_cache_leaves_the_model_and_other_caches_alone():
    model = tiny_model([{}, {}])
    ids = prompt(30)
    reference = model.generate(ids, max_new_tokens=5, do_sample=False)
    model.generate(ids, max_new_tokens=5, do_sample=False, cache=new_pyramid_cache(model, budget=12,
                                                                                            window=4, sinks=2))
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), reference)


def test_reset_undoes_the_compaction_and_crop_is_refused_after_it():
    model = tiny_model([{}, {}])
    ids = prompt(30)
    cache = new_pyramid_cache(model, budget=12, window=4, sinks=2)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, cache=cache)
    assert cache.pyramid.compacted and not cache.is_croppable
    with pytest.raises(ValueError, match="cannot crop a cache compacted by PyramidKV"):
        cache.crop(-1)
    cache.reset()
    assert not cache.pyramid.compacted and not any(key[0] == "pyramid" for key in cache.layouts)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, cache=cache), first)


def test_refuses_models_without_global_layers_and_missing_settings():
    model = tiny_model([{"attention": "window", "window": 8}, {"attention": "window", "window": 8}])
    with pytest.raises(PyramidError, match="every layer of this model uses a sliding window"):
        new_pyramid_cache(model, budget=16, window=4, sinks=0)
    with pytest.raises(PyramidError, match="no PyramidKV settings"):
        new_pyramid_cache(tiny_model([{}]))


def test_config_default_is_used_when_no_settings_are_given():
    model = tiny_model([{}, {}])
    model.config.compression = {**model.config.compression,
                                "inference": {"pyramid": {"budget": 16, "schedule": "uniform", "window": 4}}}
    cache = new_pyramid_cache(model)
    assert (cache.pyramid.settings.budget, cache.pyramid.settings.window) == (16, 4)
    model.generate(prompt(40), max_new_tokens=2, do_sample=False, cache=cache)
    assert cache.pyramid.kept == {0: 16, 1: 16}
    assert math.isclose(cache.kv_bytes_per_token(), cache.cache_bytes() / 41)


def test_plain_generate_applies_the_export_time_default():
    """compression.inference.pyramid in the config: generate() with no cache argument compacts as an explicit
    new_pyramid_cache would; KVForgeCache(config, pyramid=False) keeps every token."""
    settings = {"budget": 16, "schedule": "uniform", "window": 4}
    explicit = tiny_model([{}, {}])
    ids = prompt(40)
    cache = new_pyramid_cache(explicit, **settings)
    expected = explicit.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)

    model = tiny_model([{}, {}])
    model.config.compression = {**model.config.compression, "inference": {"pyramid": settings}}
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.past_key_values.pyramid.kept == {0: 16, 1: 16}
    assert all(t.shape[2] < ids.shape[1] for _, name, t in out.past_key_values.named_tensors() if name == "key")
    full = model.generate(ids, max_new_tokens=6, do_sample=False,
                          cache=KVForgeCache(model.config, pyramid=False))
    assert torch.equal(full, tiny_model([{}, {}]).generate(ids, max_new_tokens=6, do_sample=False))
