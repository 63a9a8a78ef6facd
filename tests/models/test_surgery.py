"""Surgery: each method is exact where it should be (full rank, nothing shared, heads unchanged, redundant
heads), lossy where it must be, leaves every other weight bit-identical, and rejects bad input loudly."""

import math

import pytest
import torch
from launch_scripts import load_launch_script
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvforge.models.calibration import CalibrationError, CalibrationStatistics, collect_statistics
from kvforge.models.configuration_kvforge import CompressionSpecError, LayerSpec, aligned_rank_step
from kvforge.models.modeling_kvforge import dequantize_slots, partial_rope_dims, quantize_slots
from kvforge.models.surgery import (
    CompressionConfig, SurgeryError, SurgerySettings, compress, measure_generate_kv_bytes,
)
from kvforge.models.surgery.head_merging import head_groups
from kvforge.models.surgery.linalg import discarded_energy, factorize, rank_for_energy, scale_pairs
from kvforge.models.surgery.low_rank import (balanced_for_rounding, nope_dim_index, rope_dim_index,
                                              select_rope_pairs)
from kvforge.models.surgery.rank_allocation import BudgetError, RankCandidate, allocate_ranks, rank_step
from kvforge.models.surgery.shared_attention import spans_by_count, spans_by_threshold

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 6, 3, 8, 48
KV_DIMS = KV_HEADS * HEAD_DIM
QUIET = {"show_progress": False}


def tiny(kind: str = "llama", seed: int = 0, layers: int = LAYERS, tied: bool = False):
    torch.manual_seed(seed)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=layers,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                        max_position_embeddings=256, tie_word_embeddings=tied)
    model = model_cls(config).eval()
    if kind == "qwen2":  # Qwen2 initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def rows(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def logits_error(model, spec_layers, settings=None, calibration=None) -> float:
    data = calibration if calibration is not None else rows()
    result = compress(model, {"layers": spec_layers}, data, settings={**QUIET, **(settings or {})})
    with torch.no_grad():
        return (result.model(rows(2, 40, seed=7)).logits - model(rows(2, 40, seed=7)).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Identity: each method at its no-op setting reproduces the original model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("name,layer,settings", [
    ("dense", {}, None),
    ("window >= sequence", {"attention": "window", "window": 64}, None),
    ("window >= sequence with sinks", {"attention": "window", "window": 40, "sinks": 4}, None),
    ("merged heads unchanged", {"kv_proj": "merged_heads", "num_kv_heads": KV_HEADS}, None),
    ("merged heads unchanged, attention-weighted", {"kv_proj": "merged_heads", "num_kv_heads": KV_HEADS},
     {"balance": "attention"}),
    ("low rank full rank", {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": KV_DIMS, "v_rank": KV_DIMS}, None),
    ("low rank full rank, attention-weighted", {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": KV_DIMS,
                                                "v_rank": KV_DIMS}, {"balance": "attention"}),
    ("partial rope, all dims rotary, full rank", {"kv_proj": "low_rank", "rope": "partial", "rope_dims": HEAD_DIM,
                                                  "kv_rank": KV_DIMS}, None),
    ("no kv sharing, average init", {}, {"kv_sharing_init": "average"}),
])
def test_identity_settings_reproduce_the_original_logits(kind, name, layer, settings):
    model = tiny(kind)
    assert logits_error(model, [layer] * LAYERS, settings) < 1e-4, name


def test_partial_rope_at_full_rank_is_exact_up_to_the_removed_rotation():
    # Full joint rank loses nothing to the latent, so what changes is only that the non-rotary dims no longer
    # rotate: the same model with rope_dims = head_dim is exact (above), fewer rotary dims is not.
    model = tiny()
    full = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 2, "kv_rank": KV_HEADS * (HEAD_DIM - 2) + KV_DIMS}
    assert logits_error(model, [full] * LAYERS) > 1e-4


# ---------------------------------------------------------------------------------------------------
# Head merging


def redundant_heads(model):
    """Make every layer's KV heads redundant: key head h = head 0 scaled-rotated per frequency pair (a
    complex scale), value head h = a linear map of head 0. Merging them into one head is then lossless."""
    half = HEAD_DIM // 2
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
            for h in range(1, KV_HEADS):
                rows_h = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                c = torch.complex(torch.randn(half, generator=g, dtype=torch.float64),
                                  torch.randn(half, generator=g, dtype=torch.float64))
                re, im = scale_pairs(k.weight[:half], k.weight[half:HEAD_DIM], c)
                k.weight[rows_h] = torch.cat([re, im]).float()
                if k.bias is not None:
                    re_b, im_b = scale_pairs(k.bias[:half], k.bias[half:HEAD_DIM], c)
                    k.bias[rows_h] = torch.cat([re_b, im_b]).float()
                mix = torch.randn(HEAD_DIM, HEAD_DIM, generator=g)
                v.weight[rows_h] = mix @ v.weight[:HEAD_DIM]
                if v.bias is not None:
                    v.bias[rows_h] = mix @ v.bias[:HEAD_DIM]
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("balance", ["none", "attention"])
def test_merging_exactly_redundant_heads_is_lossless(kind, balance):
    model = redundant_heads(tiny(kind))
    merged = {"kv_proj": "merged_heads", "num_kv_heads": 1}
    assert logits_error(model, [merged] * LAYERS, {"balance": balance}) < 1e-4


def test_merging_real_heads_is_lossy_and_yields_an_ordinary_gqa_layer():
    model = tiny()
    result = compress(model, {"layers": [{"kv_proj": "merged_heads", "num_kv_heads": 1}] * LAYERS}, rows(), settings=QUIET)
    attn = result.model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (HEAD_DIM, HIDDEN) and attn.v_proj.weight.shape == (HEAD_DIM, HIDDEN)
    assert attn.q_proj.weight.shape == (HEADS * HEAD_DIM, HIDDEN)
    assert logits_error(model, [{"kv_proj": "merged_heads", "num_kv_heads": 1}] * LAYERS) > 1e-3


def test_kv_from_consumers_of_a_merged_producer_get_the_fold_too():
    # With redundant heads, merging the producer must not change what its kv_from consumer computes.
    model = redundant_heads(tiny())
    shared = [{}, {"kv_from": 0}, {}, {"kv_from": 2}]
    merged = [{"kv_proj": "merged_heads", "num_kv_heads": 1}, {"kv_from": 0}, {}, {"kv_from": 2}]
    probe = rows(2, 40, seed=7)
    with torch.no_grad():
        a = compress(model, {"layers": shared}, rows(), settings=QUIET).model(probe).logits
        b = compress(model, {"layers": merged}, rows(), settings=QUIET).model(probe).logits
    assert (a - b).abs().max().item() < 1e-4


def test_head_groups_cover_every_query_head_consistently():
    groups = head_groups(12, 6, 4)  # m does not divide n_kv: new heads summarise overlapping old heads
    assert groups.members == ((0, 1), (1, 2), (3, 4), (4, 5))
    for q in range(12):
        assert groups.old_of_query[q] in groups.members[groups.new_of_query[q]]
    with pytest.raises(ValueError, match="must divide num_attention_heads=9"):
        head_groups(9, 3, 2)


# ---------------------------------------------------------------------------------------------------
# Untouched weights


@pytest.mark.parametrize("tied", [False, True])
def test_weights_outside_attention_are_bit_identical_after_lossy_surgery(tied):
    model = tiny("qwen2", tied=tied)
    spec = [{"kv_proj": "merged_heads", "num_kv_heads": 1},
            {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 5, "v_rank": 7},
            {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 2, "kv_rank": 9},
            {"kv_from": 2}]
    compressed = compress(model, {"layers": spec}, rows(), settings=QUIET).model
    before, after = model.state_dict(), compressed.state_dict()
    untouched = [k for k in before if ".self_attn." not in k]
    assert untouched and all(k in after for k in untouched)
    for key in untouched:
        assert torch.equal(before[key], after[key]), key
    assert (compressed.lm_head.weight is compressed.model.embed_tokens.weight) == tied


def test_the_compressed_model_saves_and_reloads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(tied=True)
    spec = [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": 2, "kv_rank": 9},
            {"attention": "window", "window": 8, "sinks": 2}, {"kv_proj": "merged_heads", "num_kv_heads": 1},
            {"probs_from": 2}]
    compressed = compress(model, {"layers": spec}, rows(), settings={**QUIET, "rope_pair_criterion": "norm"}).model
    compressed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.model.layers[0].self_attn.rope_index, compressed.model.layers[0].self_attn.rope_index)
    probe = rows(2, 24, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, compressed(probe).logits)


# ---------------------------------------------------------------------------------------------------
# Low rank


def test_reconstruction_error_falls_monotonically_with_rank_and_equals_discarded_energy():
    model = tiny("qwen2")
    data = rows(16, 32)
    stats = collect_statistics(model, data, show_progress=False)
    k_proj = model.model.layers[1].self_attn.k_proj
    captured = []
    handle = k_proj.register_forward_hook(lambda m, a, out: captured.append(out.detach().reshape(-1, KV_DIMS)))
    with torch.no_grad():
        model(data)
    handle.remove()
    y = torch.cat(captured).double()                         # [N, d] the actual k_proj outputs
    second, mean = stats.output_moments(1, k_proj.weight, k_proj.bias)
    errors = []
    for rank in range(1, KV_DIMS + 1):
        f = factorize(k_proj.weight, k_proj.bias, second, mean, rank)
        # Uncentred PCA, no offsets: the rebuilt output is U U^T y.
        u = f.up_weight.double()
        error = (y - y @ u @ u.T).pow(2).sum(1).mean().item()
        assert error == pytest.approx(float(f.eigenvalues[rank:].sum()), rel=1e-4, abs=1e-6)
        errors.append(error)
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-8 and errors[0] > errors[-1]


def test_factorize_with_offsets_and_scale_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(500, 10, generator=g, dtype=torch.float64) + 2.0
    y = x @ weight.T + bias
    second, mean = y.T @ y / len(y), y.mean(0)
    for kwargs in ({}, {"offset": mean, "restore_offset": True}, {"scale": torch.rand(6, generator=g, dtype=torch.float64) + 0.1}):
        f = factorize(weight, bias, second, mean, 6, **kwargs)
        latent = x @ f.down_weight.T + (f.down_bias if f.down_bias is not None else 0)
        rebuilt = latent @ f.up_weight.T + (f.up_bias if f.up_bias is not None else 0)
        assert torch.allclose(rebuilt, y, atol=1e-8), kwargs
    # A centred rank-r fit is never worse than the uncentred one.
    centred = factorize(weight, bias, second, mean, 2, offset=mean, restore_offset=True)
    plain = factorize(weight, bias, second, mean, 2)
    assert centred.eigenvalues[2:].sum() <= plain.eigenvalues[2:].sum() + 1e-9


def test_rank_for_energy():
    spectrum = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0])
    assert rank_for_energy(spectrum, 0.5) == 1
    assert rank_for_energy(spectrum, 0.75) == 2
    assert rank_for_energy(spectrum, 1.0) == 5
    assert discarded_energy(spectrum, 2) == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        rank_for_energy(spectrum, 1.5)


def test_rope_pair_selection_and_layout_match_the_modeling_code():
    q_energy = torch.ones(HEADS, HEAD_DIM // 2)
    k_energy = torch.tensor([[1.0, 9.0, 4.0, 0.1], [5.0, 0.1, 0.1, 6.0], [0.1, 0.1, 3.0, 2.0]])
    pairs = select_rope_pairs(q_energy, k_energy, 2, "norm")
    assert pairs.tolist() == [[1, 2], [0, 3], [2, 3]]
    assert select_rope_pairs(q_energy, k_energy, 2, "high").tolist() == [[0, 1]] * 3
    assert select_rope_pairs(q_energy, k_energy, 2, "low").tolist() == [[2, 3]] * 3
    assert select_rope_pairs(q_energy, k_energy, 2, "uniform").tolist() == [[0, 2]] * 3
    rope, nope = partial_rope_dims(pairs, HEAD_DIM)
    assert torch.equal(rope, rope_dim_index(pairs, HEAD_DIM))
    assert torch.equal(nope, nope_dim_index(rope, HEAD_DIM))
    with pytest.raises(ValueError, match="rope pair criterion"):
        select_rope_pairs(q_energy, k_energy, 2, "random")


# ---------------------------------------------------------------------------------------------------
# Rank allocation under a budget


def test_greedy_allocation_spends_the_budget_exactly_on_the_largest_weighted_eigenvalues():
    spectra = {"a": torch.tensor([10.0, 5.0, 1.0, 0.5]), "b": torch.tensor([6.0, 4.0, 3.0, 2.0]),
               "c": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    candidates = [RankCandidate(k, s, min_rank=1) for k, s in spectra.items()]
    for budget in range(3, 13):
        ranks = allocate_ranks(candidates, budget, normalization="absolute")
        assert sum(ranks.values()) == budget
    assert allocate_ranks(candidates, 5, normalization="absolute") == {"a": 2, "b": 2, "c": 1}
    with pytest.raises(BudgetError, match="minimum ranks alone cost 3"):
        allocate_ranks(candidates, 2)


def test_greedy_allocation_in_steps_prices_each_step_by_its_mean_and_keeps_ranks_on_the_step():
    """A 4-bit cache's ranks grow two at a time: a step is bought for the mean gain of its two directions."""
    a = RankCandidate("a", torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0]), min_rank=2, step=2)  # top 4: odd width
    b = RankCandidate("b", torch.tensor([6.0, 5.0, 1.0, 1.0]), min_rank=2, step=2)
    c = RankCandidate("c", torch.tensor([4.5, 4.0, 3.0]), min_rank=1)  # a step of 1 beside them
    assert a.upper() == 4 and b.upper() == 4 and c.upper() == 3
    # After the minimums (2, 2, 1 = 5): c's 4.0, then b's step (1 + 1) / 2 = 1 against a's 0 ...
    assert allocate_ranks([a, b, c], 6, normalization="absolute") == {"a": 2, "b": 2, "c": 2}
    assert allocate_ranks([a, b, c], 9, normalization="absolute") == {"a": 2, "b": 4, "c": 3}
    # ... and a step that does not fit whole is not bought in part
    assert allocate_ranks([a, b, c], 7, normalization="absolute") == {"a": 2, "b": 2, "c": 3}
    ranks = allocate_ranks([a, b, c], 100, normalization="absolute")
    assert ranks == {"a": 4, "b": 4, "c": 3}
    with pytest.raises(BudgetError, match="step >= 1"):
        allocate_ranks([RankCandidate("d", torch.ones(3), step=0)], 5)


@pytest.mark.parametrize("bits", [4, 8])
def test_latents_balanced_for_a_low_bit_cache_map_the_same_and_round_with_less_error(bits):
    """Latent channels at unit RMS on the calibration data: the same map before rounding, and after rounding (one
    absmax scale per token) a smaller error in what the up-projection rebuilds (heavy-tailed activations, as a
    transformer's are)."""
    torch.manual_seed(0)
    hidden, out, rank, tokens = 32, 24, 12, 4096
    heavy = torch.distributions.StudentT(3.0).sample((tokens, hidden)).double()
    x = heavy @ torch.diag(torch.logspace(1, -2, hidden, dtype=torch.float64))
    stats = CalibrationStatistics(input_second_moment=(x.T @ x / tokens)[None], input_mean=x.mean(0)[None],
                                  tokens=tokens, rows=1, seq_len=tokens)
    weight, bias = torch.randn(out, hidden, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    second, mean = stats.output_moments(0, weight, bias)
    f = factorize(weight.float(), bias.float(), second.float(), mean.float(), rank)
    balanced = balanced_for_rounding(f, stats, 0)

    def latent(g):
        return x.float() @ g.down_weight.T + g.down_bias

    def rebuilt(g, c):
        return c @ g.up_weight.T + (0 if g.up_bias is None else g.up_bias)

    assert latent(balanced).pow(2).mean(0).sqrt().sub(1).abs().max() < 1e-3
    assert latent(f).pow(2).mean(0).sqrt().max() > 10 * latent(f).pow(2).mean(0).sqrt().min()  # PCA: far from it
    target = rebuilt(f, latent(f))
    torch.testing.assert_close(rebuilt(balanced, latent(balanced)), target, atol=1e-3, rtol=1e-4)
    error = {name: (rebuilt(g, dequantize_slots(*quantize_slots(latent(g)[None], 1, bits))[0]) - target).pow(2).mean()
             for name, g in (("pca", f), ("balanced", balanced))}
    assert error["balanced"] < 0.9 * error["pca"]


def test_surgery_balances_4_bit_latents_by_default_and_others_only_when_asked():
    """low_bit_balance: "auto" balances 4-bit layers only (8 bits save nothing by it, and its scaled parameters
    trained worse in the main job); "all" and "none" as they say; the report says which layers were balanced."""
    model = tiny()
    layer = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 12}
    spec = {"layers": [{**layer, "cache_bits": 4}, {**layer, "cache_bits": 8}] + [layer] * (LAYERS - 2)}
    statistics = compress(model, spec, rows(), settings=QUIET).statistics
    down = {}
    for mode in ("auto", "all", "none"):
        result = compress(model, spec, statistics=statistics, settings={**QUIET, "low_bit_balance": mode})
        layers = result.model.model.layers
        down[mode] = [layers[i].self_attn.k_down.weight.detach().clone() for i in range(3)]
        flags = [entry.get("balanced_for_rounding") for entry in result.report["layers"][:3]]
        assert flags == {"auto": [True, False, None], "all": [True, True, None], "none": [False, False, None]}[mode]
    assert not torch.equal(down["auto"][0], down["none"][0]) and torch.equal(down["auto"][0], down["all"][0])
    assert torch.equal(down["auto"][1], down["none"][1]) and not torch.equal(down["all"][1], down["none"][1])
    assert torch.equal(down["auto"][2], down["all"][2])  # a layer in the model's dtype is never balanced
    with pytest.raises(SurgeryError, match="low_bit_balance='some' is not one of"):
        compress(model, spec, statistics=statistics, settings={**QUIET, "low_bit_balance": "some"})


def test_greedy_budget_fraction_through_compress_is_met_exactly():
    model = tiny()
    spec = [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 12}] * LAYERS
    original = LAYERS * 2 * KV_DIMS * 2  # bf16 bytes per token
    any_rank = {**QUIET, "rank_allocation": "greedy", "rank_multiple": 1}  # every byte spendable
    for fraction in (0.5, 0.25, 0.125):
        result = compress(model, {"layers": spec}, rows(), settings={**any_rank, "budget_fraction": fraction})
        assert result.report["spec_kv_bytes_per_token"] == original * fraction
    # The default greedy budget is the spec's own total: ranks move, the total does not.
    result = compress(model, {"layers": spec}, rows(), settings=any_rank)
    assert sum(l.k_rank + l.v_rank for l in result.spec.layers) == LAYERS * 24


def test_greedy_budget_buys_twice_the_directions_with_an_8_bit_cache_and_four_times_with_4_bits():
    """The budget is spent in bytes: int8 latents cost one byte per direction and token plus their scales, 4-bit
    ones half a byte, in even ranks."""
    model = tiny()
    original = LAYERS * 2 * KV_DIMS * 2  # bf16 bytes per token
    directions = {}
    for bits in (None, 8, 4):
        layer = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 12, "cache_bits": bits}
        result = compress(model, {"layers": [layer] * LAYERS}, rows(), settings={
            **QUIET, "rank_allocation": "greedy", "budget_fraction": 0.25, "rank_multiple": 1})
        assert result.report["spec_kv_bytes_per_token"] == original * 0.25
        assert all(l.cache_bits == bits for l in result.spec.layers)
        directions[bits] = sum(l.k_rank + l.v_rank for l in result.spec.layers)
    scales = LAYERS * 2 * 2  # two bf16 scales per layer and token
    assert directions[8] == 2 * directions[None] - scales
    assert directions[4] == 4 * directions[None] - 2 * scales
    assert all(l.k_rank % 2 == l.v_rank % 2 == 0 for l in result.spec.layers)


def test_auto_rank_multiple_keeps_cached_rows_on_16_bytes_and_a_narrow_matrix_keeps_the_format_step():
    assert [aligned_rank_step(bits, "bfloat16") for bits in (None, 8, 4)] == [8, 16, 32]
    assert aligned_rank_step(None, "float32") == 4 and aligned_rank_step(None, torch.float16) == 8

    def step(bits, width, multiple, dtype="bfloat16"):
        return rank_step(LayerSpec(kv_proj="low_rank", rope="pre_rope_latent", k_rank=2, v_rank=2, cache_bits=bits),
                         width, SurgerySettings(rank_multiple=multiple, cache_dtype=dtype))

    assert [step(bits, 192, "auto") for bits in (None, 8, 4)] == [8, 16, 32]
    assert step(None, 192, "auto", "float32") == 4
    assert step(4, 192, 3) == 6 and step(8, 192, 1) == 1  # with the format's step; 1: as before
    assert step(4, 24, "auto") == 2 and step(8, 12, 16) == 1  # no aligned rank fits: the format's step


@pytest.mark.parametrize("allocation", ["greedy", "energy"])
def test_ranks_in_a_rank_multiple_stay_within_the_budget(allocation):
    model = tiny()
    spec = {"layers": [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 12}] * LAYERS}
    statistics = compress(model, spec, rows(), settings=QUIET).statistics
    budget = {"budget_fraction": 0.5} if allocation == "greedy" else {"energy_threshold": 0.9}
    original = LAYERS * 2 * KV_DIMS * 2  # bf16 bytes per token
    ranks = {}
    for multiple in ("auto", 8, 1):
        result = compress(model, spec, statistics=statistics,
                          settings={**QUIET, "rank_allocation": allocation, "rank_multiple": multiple, **budget})
        ranks[multiple] = [(l.k_rank, l.v_rank) for l in result.spec.layers]
        assert result.report["settings"]["rank_multiple"] == multiple
        if allocation == "greedy":  # within the budget, short of it by less than one step of 8 bf16 directions
            assert original * 0.5 - 8 * 2 < result.report["spec_kv_bytes_per_token"] <= original * 0.5
    assert ranks["auto"] == ranks[8] and all(r % 8 == 0 for layer in ranks[8] for r in layer)
    assert any(r % 8 for layer in ranks[1] for r in layer)  # the multiple is what moved them


@pytest.mark.parametrize("bad", [0, -16, 2.5, "16 bytes", True])
def test_a_bad_rank_multiple_is_a_clear_error(bad):
    with pytest.raises(SurgeryError, match=r"rank_multiple=.* is not 'auto' or a positive integer"):
        SurgerySettings.from_dict({"rank_multiple": bad})


def test_budget_below_the_fixed_part_of_the_cache_is_a_clear_error():
    model = tiny()
    spec = [{}] * 2 + [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 12}] * 2
    with pytest.raises(SurgeryError, match="leaves .* bytes/token for low-rank latents"):
        compress(model, {"layers": spec}, rows(), settings={**QUIET, "rank_allocation": "greedy", "budget_fraction": 0.25})


# ---------------------------------------------------------------------------------------------------
# Shared attention and KV sharing


def test_span_selection_by_threshold_and_count():
    divergence = torch.full((5, 5), math.nan)
    values = {(1, 0): 0.1, (2, 0): 0.5, (2, 1): 0.05, (3, 0): 0.9, (3, 1): 0.4, (3, 2): 0.2,
              (4, 0): 0.9, (4, 1): 0.9, (4, 2): 0.9, (4, 3): 0.01}
    for (i, j), v in values.items():
        divergence[i, j] = v
    assert spans_by_threshold(divergence, 0.3) == [None, 0, None, 2, None]
    # Cheapest join first (4 <- 3 at 0.01), then 2 <- 1 (0.05); 3 may not join since 4 now reads it.
    assert spans_by_count(divergence, 2) == [None, None, 1, None, 3]
    with pytest.raises(ValueError, match="count must be an integer"):
        spans_by_count(divergence, 5)


def test_shared_attention_from_calibration_maps_and_named_spans():
    model = tiny()
    result = compress(model, {"layers": [{}] * LAYERS}, rows(4, 24),
                      settings={**QUIET, "shared_attention": {"count": 2}, "attention_rows": 2})
    consumers = [l.probs_from for l in result.spec.layers]
    assert sum(p is not None for p in consumers) == 2
    assert result.statistics.attention_divergence.shape == (LAYERS, LAYERS)
    attn = result.model.model.layers[[i for i, p in enumerate(consumers) if p is not None][0]].self_attn
    assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj") and hasattr(attn, "v_proj")


def test_reusing_identical_attention_probabilities_is_exact():
    # Layer 0 adds nothing to the residual stream and layer 1 has layer 0's norm, q and k: both layers see
    # the same input and compute the same probabilities, so layer 1 reusing layer 0's loses nothing.
    model = tiny()
    first, second = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        first.self_attn.o_proj.weight.zero_()
        first.mlp.down_proj.weight.zero_()
        second.input_layernorm.weight.copy_(first.input_layernorm.weight)
        second.self_attn.q_proj.weight.copy_(first.self_attn.q_proj.weight)
        second.self_attn.k_proj.weight.copy_(first.self_attn.k_proj.weight)
    assert logits_error(model, [{}, {"probs_from": 0}, {}, {}]) < 1e-5
    assert logits_error(model, [{}, {}, {}, {"probs_from": 2}]) > 1e-4


def test_kv_sharing_average_init_averages_the_group_into_the_producer():
    model = tiny()
    result = compress(model, {"layers": [{}, {"kv_from": 0}, {"kv_from": 0}, {}]}, None,
                      settings={**QUIET, "kv_sharing_init": "average"})
    expected = torch.stack([model.model.layers[i].self_attn.k_proj.weight for i in range(3)]).mean(0)
    assert torch.allclose(result.model.model.layers[0].self_attn.k_proj.weight, expected, atol=1e-7)
    assert not hasattr(result.model.model.layers[1].self_attn, "k_proj")


# ---------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_moments_match_the_projection_outputs():
    model = tiny("qwen2")
    data = rows(4, 16)
    stats = collect_statistics(model, data, batch_size=3, show_progress=False)
    v_proj = model.model.layers[2].self_attn.v_proj
    captured = []
    handle = v_proj.register_forward_hook(lambda m, a, out: captured.append(out.detach().reshape(-1, KV_DIMS)))
    with torch.no_grad():
        model(data)
    handle.remove()
    y = torch.cat(captured).double()
    second, mean = stats.output_moments(2, v_proj.weight, v_proj.bias)
    assert stats.tokens == 64
    assert torch.allclose(second, y.T @ y / len(y), atol=1e-5)
    assert torch.allclose(mean, y.mean(0), atol=1e-6)


def test_calibration_runs_where_it_is_told_and_leaves_the_model_where_it_was(monkeypatch):
    model = tiny()
    data = rows(4, 16)
    here = collect_statistics(model, data, show_progress=False)
    moves = []
    real_to = model.to
    monkeypatch.setattr(model, "to", lambda device: moves.append(str(device)) or real_to("cpu"))
    there = collect_statistics(model, data, show_progress=False, device="cpu")
    assert torch.equal(here.input_second_moment, there.input_second_moment) and moves == ["cpu", "cpu"]
    # A forward that fails still brings the model home.
    monkeypatch.setattr(model.model, "forward", lambda **kw: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        collect_statistics(model, data, show_progress=False, device="meta")
    assert moves[-2:] == ["meta", "cpu"]
    with pytest.raises(SurgeryError, match="calibration_device='gpu' is not a device"):
        SurgerySettings(calibration_device="gpu").validate()


def test_calibration_rejects_bad_rows():
    model = tiny()
    with pytest.raises(CalibrationError, match="outside the vocabulary"):
        collect_statistics(model, torch.full((2, 8), 500), show_progress=False)
    with pytest.raises(CalibrationError, match="integer token ids"):
        collect_statistics(model, torch.zeros(2, 8), show_progress=False)
    with pytest.raises(CalibrationError, match=r"\[N >= 1, seq_len >= 2\]"):
        collect_statistics(model, torch.zeros(8, dtype=torch.long), show_progress=False)


# ---------------------------------------------------------------------------------------------------
# Entry points and errors


def _compress_section(model, section, calibration_rows):
    compression = CompressionConfig.from_section(section)
    return compress(model, compression.spec_for(model.config), calibration_rows, settings=compression.surgery).model


def test_compression_config_accepts_preset_names_and_config_sections():
    model = tiny(layers=6)
    compressed = _compress_section(model, "character-ai", None)
    assert [l.attention for l in compressed.config.compression_spec.layers] == ["global"] + ["window"] * 5
    section = {"preset": "low-rank", "arguments": {"budget": 0.5}, "surgery": {"rank_allocation": "greedy", **QUIET}}
    compressed = _compress_section(model, section, rows())
    assert compressed.config.kv_cache_bytes_per_token("bfloat16") == 0.5 * 6 * 2 * KV_DIMS * 2


def test_compression_config_errors_are_one_line_and_name_the_key_path():
    cases = {
        "compression.surgery.rank_alocation: unknown key; did you mean 'rank_allocation'?":
            {"preset": "low-rank", "surgery": {"rank_alocation": "greedy"}},
        "compression.argument: unknown key; did you mean 'arguments'?": {"preset": "standard", "argument": {}},
        "compression.preset = 'low-rnk': unknown preset; did you mean 'low-rank'?": {"preset": "low-rnk"},
        "compression.surgery = 3: expected a mapping": {"preset": "standard", "surgery": 3},
        "compression.calibration.tokens=0 is out of range": {"preset": "standard", "calibration": {"tokens": 0}},
        "compression.calibration: unknown key 'token' (did you mean 'tokens'?)":
            {"preset": "standard", "calibration": {"token": 8}},
    }
    for message, section in cases.items():
        with pytest.raises(ValueError) as err:
            CompressionConfig.from_section(section)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), (message, str(err.value))


def test_the_kv_budget_is_one_knob_whichever_key_spells_it():
    config = tiny(layers=6).config
    greedy = {"rank_allocation": "greedy"}
    by_argument = CompressionConfig.from_section({"preset": "low-rank", "arguments": {"budget": 0.25}, "surgery": greedy})
    by_surgery = CompressionConfig.from_section({"preset": "low-rank", "surgery": {**greedy, "budget_fraction": 0.25}})
    both = CompressionConfig.from_section({"preset": "low-rank", "arguments": {"budget": 0.25},
                                           "surgery": {**greedy, "budget_fraction": 0.25}})
    for compression in (by_argument, by_surgery, both):  # the preset is built at it and greedy re-spends it
        assert compression.budget == compression.surgery.budget_fraction == compression.arguments["budget"] == 0.25
        assert compression.spec_for(config).to_dict() == by_argument.spec_for(config).to_dict()
    # With the preset's uniform ranks as given, the preset alone meets it.
    uniform = CompressionConfig.from_section({"preset": "low-rank", "surgery": {"budget_fraction": 0.25}})
    assert uniform.budget == uniform.arguments["budget"] == 0.25 and uniform.surgery.budget_fraction is None
    with pytest.raises(SurgeryError, match=r"compression.surgery.budget_fraction = 0.5 and compression.arguments.budget "
                                           r"= 0.25 disagree"):
        CompressionConfig.from_section({"preset": "low-rank", "arguments": {"budget": 0.25},
                                        "surgery": {**greedy, "budget_fraction": 0.5}})
    with pytest.raises(SurgeryError, match=r"compression.arguments.budget = 2: expected the KV budget"):
        CompressionConfig.from_section({"preset": "low-rank", "arguments": {"budget": 2}})
    # A budget nothing meets: no preset builds at it and (without greedy) nothing re-spends it, or no low-rank layer.
    with pytest.raises(SurgeryError, match="needs compression.surgery.rank_allocation='greedy'"):
        CompressionConfig.from_section({"layers": [{}] * 6, "surgery": {"budget_fraction": 0.5}})
    with pytest.raises(SurgeryError, match="nothing in this spec meets a budget"):
        CompressionConfig.from_section({"preset": "mixattention-ma", "surgery": {**greedy, "budget_fraction": 0.5}}
                                       ).spec_for(config)


def test_compress_errors_name_the_problem():
    model = tiny()
    low = [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 4, "v_rank": 4}] * LAYERS
    with pytest.raises(SurgeryError, match="pass calibration_rows"):
        compress(model, {"layers": low}, None, settings=QUIET)
    with pytest.raises(SurgeryError, match="did you mean 'kv_sharing_init'"):
        SurgerySettings.from_dict({"kv_share_init": "average"})
    with pytest.raises(SurgeryError, match="needs compression.surgery.rank_allocation='greedy'"):
        SurgerySettings.from_dict({"budget_fraction": 0.5})
    with pytest.raises(CompressionSpecError, match=r"compression.layers\[1\].kv_from=3 must name an earlier layer"):
        compress(model, {"layers": [{}, {"kv_from": 3}, {}, {}]}, None, settings=QUIET)
    with pytest.raises(SurgeryError, match="exactly one of `preset`"):
        CompressionConfig.from_section({"preset": "standard", "layers": []})
    with pytest.raises(SurgeryError, match="did you mean 'arguments'"):
        CompressionConfig.from_section({"preset": "standard", "argument": {}})


def test_generate_kv_bytes_are_measured_from_the_cache_and_match_the_spec():
    model = tiny()
    spec = [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 5, "v_rank": 7},
            {"kv_from": 0}, {"kv_proj": "merged_heads", "num_kv_heads": 1}, {"probs_from": 2}]
    result = compress(model, {"layers": spec}, rows(), settings=QUIET)
    measured = measure_generate_kv_bytes(result.model, rows(1, 20), max_new_tokens=4)
    per_token_elements = [12, 0, 2 * HEAD_DIM, KV_DIMS]
    assert measured["tokens"] == 23  # the last generated token is never fed back
    assert measured["per_layer_bytes"] == [e * 23 * 4 for e in per_token_elements]  # fp32 model
    assert measured["bytes_per_token"] == result.model.config.kv_cache_bytes_per_token("float32", num_tokens=23)


def test_compress_launcher_rejects_bad_specs_clearly(tmp_path):
    launcher = load_launch_script("compress")
    config = tiny(layers=6).config
    with pytest.raises(SystemExit, match="does not exist"):
        launcher.load_spec_section(str(tmp_path / "missing.yaml"), {})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match="must hold a mapping"):
        launcher.load_spec_section(str(tmp_path / "list.yaml"), {})
    with pytest.raises(SurgeryError, match="nothing in this spec meets a budget"):
        CompressionConfig.from_section(launcher.apply_budget({"preset": "mixattention-ma", "arguments": {}}, 0.5)
                                       ).spec_for(config)
    with pytest.raises(SystemExit, match=r"fraction in \(0, 1\]"):
        launcher.apply_budget({"preset": "low-rank", "arguments": {}}, 2.0)
    # A training config's compression section is read as is; --budget sets the one knob, which reaches both the
    # preset and the ranks (and replaces the section's own budget).
    (tmp_path / "train.yaml").write_text("compression:\n  preset: low-rank\n"
                                         "  arguments: {rope: partial, rope_dims: 2, budget: 0.5}\n")
    section = launcher.apply_budget(launcher.load_spec_section(str(tmp_path / "train.yaml"), {}), 0.25)
    assert section["surgery"] == {"rank_allocation": "greedy", "budget_fraction": 0.25}
    compression = CompressionConfig.from_section(section)
    assert compression.arguments["budget"] == compression.surgery.budget_fraction == 0.25
    with pytest.raises(SystemExit, match="key=value"):
        launcher._key_values(["window"], "--arg")


def test_compress_launcher_measures_the_cache_on_a_copy_and_leaves_the_weights_alone():
    from kvforge.models.surgery.measure import measure_original_kv_bytes

    launcher = load_launch_script("compress")
    model = tiny(layers=2)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    measured = launcher.measured_in(torch.bfloat16, measure_original_kv_bytes, model, torch.randint(3, 64, (1, 9)))
    per_token = 2 * KV_HEADS * HEAD_DIM  # K and V elements per layer
    assert measured["bytes_per_token"] == model.config.num_hidden_layers * per_token * 2  # bf16
    # Cast down and back in place, every weight would now be rounded to bf16 (and saved or scored so).
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.real_model
def test_real_smollm2_compresses_and_its_generate_cache_matches_the_spec(smollm2_dir):
    from kvforge.models.loading import load_pretrained
    from kvforge.models.presets import build_preset

    model, _ = load_pretrained(str(smollm2_dir))
    spec = build_preset("mixattention-offset", model.config, window=64, sinks=4)
    producers = [i for i, layer in enumerate(spec.layers) if layer.kv_from is None]
    for i in producers[:-1]:  # every cache producer low-rank but the last, which merges to one KV head
        layer = spec.layers[i]
        layer.kv_proj, layer.rope, layer.k_rank, layer.v_rank = "low_rank", "pre_rope_latent", 64, 96
    spec.layers[producers[-1]].kv_proj, spec.layers[producers[-1]].num_kv_heads = "merged_heads", 1
    calibration = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    result = compress(model, spec, calibration, settings=QUIET)
    measured = measure_generate_kv_bytes(result.model, calibration[:1, :100], max_new_tokens=4)
    arithmetic = result.model.config.kv_cache_bytes(measured["tokens"], dtype="float32")
    assert measured["total_bytes"] == arithmetic
    assert measured["bytes_per_token"] < 23040 * 2 * 0.25  # fp32 original: 46,080 bytes/token
    with torch.no_grad():
        assert torch.isfinite(result.model(calibration[:1, :48]).logits).all()


# ---------------------------------------------------------------------------------------------------
# Shared rotary key (rope_shared, DeepSeek MLA)


def attention_output_error(original, compressed, ids) -> float:
    """Mean over layers of the relative error of the compressed layer's attention output, each layer of both
    models fed the original's input to that layer."""
    inputs = {}
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: inputs.setdefault(i, (args, kwargs)), with_kwargs=True)
        for i, layer in enumerate(original.model.layers)]
    with torch.no_grad():
        original(ids)
    for handle in handles:
        handle.remove()
    errors = []
    for i, layer in enumerate(original.model.layers):
        args, kwargs = inputs[i]
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            expected = layer.self_attn(*args, **kwargs)[0]
        captured = {}
        attn = compressed.model.layers[i].self_attn
        swap = attn.register_forward_pre_hook(lambda m, a, kw: ((hidden,) + a[1:], kw), with_kwargs=True)
        keep = attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out[0]))
        with torch.no_grad():
            compressed(ids)
        swap.remove()
        keep.remove()
        errors.append(((captured["out"] - expected).norm() / expected.norm()).item())
    return sum(errors) / len(errors)


def test_shared_rotary_key_surgery_beats_the_heads_mean_and_decodes_like_its_forward(monkeypatch):
    """The query-weighted PCA over heads (low_rank.shared_rope_mixing) against the naive shared key, the mean of
    the heads' rotary keys read by every head unscaled: lower attention-output error, at full latent rank (so only
    the shared key and the latent norm differ from the original) and at a quarter of it."""
    from kvforge.models.surgery import low_rank

    model = tiny()
    with torch.no_grad():  # KV heads of unequal loudness, as trained ones are (random heads are all alike)
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.view(KV_HEADS, HEAD_DIM, HIDDEN).mul_(torch.tensor([1.0, 3.0, 0.5])[:, None, None])
    ids = rows(2, 40, seed=7)
    errors = {}
    for rank in (2 * KV_DIMS, KV_DIMS // 2):
        layer = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 4, "kv_rank": rank, "rope_shared": True}
        fitted = compress(model, {"layers": [layer] * LAYERS}, rows(), settings=QUIET).model
        with monkeypatch.context() as patch:
            patch.setattr(low_rank, "shared_rope_mixing", lambda k, q, pairs, n_kv, d: (
                torch.full((pairs.shape[1], n_kv), 1.0 / n_kv, dtype=torch.float64),
                torch.ones(pairs.shape[1], n_kv, dtype=torch.float64)))
            naive = compress(model, {"layers": [layer] * LAYERS}, rows(), settings=QUIET).model
        errors[rank] = (attention_output_error(model, fitted, ids), attention_output_error(model, naive, ids))
        assert errors[rank][0] < errors[rank][1], errors
    # Full rank: only the shared key differs from the original (measured 0.0147 against 0.0177); at a quarter of
    # it the latent's own error dominates both (0.3460 against 0.3461).
    assert errors[2 * KV_DIMS][0] < 0.9 * errors[2 * KV_DIMS][1], errors
    attn = fitted.model.layers[0].self_attn
    assert attn.k_rope.weight.shape == (4, HIDDEN) and attn.q_rope.weight.shape == (HEADS * 4, HIDDEN)
    assert attn.rope_index.shape == (1, 2)
    # What surgery builds decodes with its cache as it computes without one.
    with torch.no_grad():
        out = fitted.generate(ids[:, :12], max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        full = fitted(out.sequences[:, :-1]).logits[:, 11:]
    assert torch.equal(out.sequences[:, 12:], full.argmax(-1))


def test_compress_launcher_reads_held_out_plain_text_folders_as_evaluate_does(tmp_path, monkeypatch):
    """--eval-source of a folder of suffixless text files (Debian's fortunes): staged as .txt links, the same rows
    as the same files named .txt (it failed with "contains no .txt... files" before)."""
    from kvforge.models.loading import load_tokenizer

    # The tokenizer first, from the cache every test shares: under the KVFORGE_CACHE below, an empty folder, it would
    # convert the embedded GGUF model again (~25 s) only to read the same tokenizer. The staging this test checks
    # reads KVFORGE_CACHE when eval_rows runs.
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    monkeypatch.setenv("KVFORGE_CACHE", str(tmp_path / "cache"))
    launcher = load_launch_script("compress")
    plain, suffixed = tmp_path / "plain", tmp_path / "suffixed"
    plain.mkdir(), suffixed.mkdir()
    for i in range(40):
        text = f"Fortune {i}: " + " ".join(f"word{i * 7 + j}" for j in range(300)) + "\n"
        (plain / f"file{i}").write_text(text)
        (suffixed / f"file{i}.txt").write_text(text)
    rows = [launcher.eval_rows(tokenizer, tokenizer.eos_token_id, str(folder), 64, 2) for folder in (plain, suffixed)]
    assert rows[0].shape == (2, 64) and torch.equal(rows[0], rows[1])
