"""Presets: every named layout yields a valid spec at SmolLM2's depth and at small depths, the MixAttention
variants place their global layers where the paper does, and bad arguments fail with a clear message."""

from types import SimpleNamespace

import pytest

from kvforge.models.configuration_kvforge import CompressionSpecError
from kvforge.models.presets import (
    PRESETS, PresetError, build_preset, character_ai, layout, mixattention_endslide, mixattention_ma,
    mixattention_offset, mixattention_pairs, preset_names,
)


def model_config(num_layers: int, heads: int = 9, kv_heads: int = 3, head_dim: int = 64):
    return SimpleNamespace(num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=head_dim, hidden_size=heads * head_dim)


ARGUMENTS = {  # presets that need arguments beyond the model's shape
    "shared-attention": lambda n: {"spans": [[0, min(2, n - 1)]]},
    "layout": lambda n: {"text": " ".join(["G"] + ["W"] * (n - 1))},
    "custom": lambda n: {"layers": [{"attention": "global"}] * n},
    "merged-heads": lambda n: {"num_kv_heads": 1},
}

MINIMUM_LAYERS = {"mixattention-ma": 3, "mixattention-endslide": 3, "mixattention-offset": 4,
                  "mixattention-pairs": 7, "shared-attention": 2}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_layers", [30, 24, 12, 6, 4, 3, 2, 1])
def test_every_preset_is_valid_or_says_why_not(name, num_layers):
    config = model_config(num_layers)
    arguments = ARGUMENTS.get(name, lambda n: {})(num_layers)
    if num_layers < MINIMUM_LAYERS.get(name, 1):
        with pytest.raises(PresetError, match="num_layers|cannot fit"):
            build_preset(name, config, **arguments)
        return
    spec = build_preset(name, config, **arguments)  # validates against the model's shape
    assert len(spec.layers) == num_layers


def globals_of(spec):
    return [(i, l.kv_from) for i, l in enumerate(spec.layers) if l.attention == "global"]


def test_mixattention_variants_at_the_papers_depth():
    assert globals_of(mixattention_ma(24)) == [(0, None), (12, 0), (23, 0)]
    assert globals_of(mixattention_endslide(24)) == [(0, None), (12, 0)]
    assert globals_of(mixattention_offset(24)) == [(4, None), (12, 4), (23, 4)]
    assert globals_of(mixattention_pairs(24)) == [(4, None), (12, 4), (16, None), (23, 16)]
    ma = mixattention_ma(24, window=512, window_group=3)
    # Window layers share one cache per run of 3 consecutive window layers; the first of a run computes it.
    assert [(l.window, l.kv_from) for l in ma.layers[1:5]] == [(512, None), (512, 1), (512, 1), (512, None)]


def test_mixattention_scales_to_smollm2_depth():
    spec = build_preset("mixattention-offset", model_config(30))
    assert globals_of(spec) == [(5, None), (15, 5), (29, 5)]


def test_character_ai_has_one_global_layer_in_six_all_sharing_one_cache():
    spec = character_ai(30)
    assert globals_of(spec) == [(0, None), (6, 0), (12, 0), (18, 0), (24, 0)]
    windows = [l for l in spec.layers if l.attention == "window"]
    assert all(l.window == 1024 for l in windows)
    # Local layers 1..5 pair up: 1 computes, 2 reads 1; 3 computes, 4 reads 3; 5 computes alone.
    assert [spec.layers[i].kv_from for i in range(1, 6)] == [None, 1, None, 3, None]


def test_low_rank_preset_meets_its_budget_exactly():
    config = model_config(30)
    for budget in (0.5, 0.25, 0.125):
        spec = build_preset("low-rank", config, budget=budget)
        assert spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == 23040 * budget
        spec = build_preset("low-rank", config, budget=budget, rope="partial", rope_dims=8)
        assert spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == 23040 * budget
        # int8 latents with bf16 scales: twice the rank (less the scales') in the same bytes
        for rope in ("pre_rope_latent", "partial"):
            spec = build_preset("low-rank", config, budget=budget, rope=rope, rope_dims=8, cache_bits=8)
            assert spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == 23040 * budget
    assert build_preset("low-rank", config, budget=0.25, cache_bits=8).layers[0].k_rank == 94  # against 48 in bf16
    # 4-bit latents: four times the elements, in even ranks; at 50% that is more than the full rank, which it keeps
    for budget in (0.25, 0.125):
        for rope in ("pre_rope_latent", "partial"):
            spec = build_preset("low-rank", config, budget=budget, rope=rope, rope_dims=8, cache_bits=4)
            assert spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == 23040 * budget
    assert build_preset("low-rank", config, budget=0.125, cache_bits=4).layers[0].k_rank == 92
    full = build_preset("low-rank", config, budget=0.5, cache_bits=4)
    assert full.layers[0].k_rank == full.layers[0].v_rank == 192
    assert build_preset("low-rank", config, budget=0.5, rope="partial", rope_dims=8, cache_bits=4).layers[0].kv_rank == 360


@pytest.mark.parametrize("name, arguments", [("standard", {}), ("mixattention-ma", {"window": 64}),
                                             ("merged-heads", {"num_kv_heads": 1})])
def test_every_preset_takes_cache_bits_on_the_layers_that_cache(name, arguments):
    config = model_config(30)
    plain = build_preset(name, config, **arguments)
    low_bit = build_preset(name, config, **arguments, cache_bits=8)
    assert [layer.cache_bits for layer in low_bit.layers] == [None if layer.kv_from is not None else 8
                                                              for layer in plain.layers]
    plain_bytes, low_bit_bytes = (spec.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16")
                                  for spec in (plain, low_bit))
    caching = sum(layer.kv_from is None and not layer.is_window for layer in plain.layers)
    assert low_bit_bytes == plain_bytes / 2 + caching * 2 * 2  # a byte per element, two bf16 scales per layer
    four_bit = build_preset(name, config, **arguments, cache_bits=4)
    assert four_bit.kv_cache_bytes_per_token(num_kv_heads=3, head_dim=64, dtype="bfloat16") == (
        plain_bytes / 4 + caching * 2 * 2)  # half a byte per element
    with pytest.raises(CompressionSpecError, match=r"compression.layers\[0\].cache_bits=3 is not supported"):
        build_preset(name, config, **arguments, cache_bits=3)


def test_layout_strings():
    spec = layout(4, "G W W<1 G<0", window=256, sinks=4)
    assert [(l.attention, l.kv_from) for l in spec.layers] == [("global", None), ("window", None), ("window", 1), ("global", 0)]
    assert spec.layers[1].sinks == 4
    with pytest.raises(PresetError, match="layout token 1 is 'X'"):
        layout(3, "G X W")
    with pytest.raises(PresetError, match="3 tokens but the model has 4 layers"):
        layout(4, "G W W")


def test_bad_presets_and_arguments_fail_clearly():
    config = model_config(30)
    with pytest.raises(PresetError, match="did you mean"):
        build_preset("mixatention-ma", config)
    with pytest.raises(PresetError, match="takes no argument"):
        build_preset("mixattention-ma", config, budget=0.5)
    with pytest.raises(PresetError, match="window must be a positive integer"):
        build_preset("character-ai", config, window=0)
    with pytest.raises(PresetError, match="budget must be a fraction"):
        build_preset("low-rank", config, budget=1.5)
    with pytest.raises(PresetError, match="leaves no room for a latent"):
        build_preset("low-rank", config, budget=0.01, rope="partial", rope_dims=32)
    with pytest.raises(CompressionSpecError, match="num_kv_heads=2 does not divide num_attention_heads=9"):
        build_preset("merged-heads", config, num_kv_heads=2)
    with pytest.raises(PresetError, match="layer 3 is in two spans"):
        build_preset("shared-attention", config, spans=[[0, 3], [2, 5]])
    # A consumer must share its producer's window: a kv_from across layouts is rejected by the spec.
    with pytest.raises(CompressionSpecError, match="give it the same attention"):
        build_preset("layout", model_config(3), text="G W<0 W")


def test_preset_names_are_listed():
    assert "mixattention-ma" in preset_names() and preset_names() == sorted(preset_names())
