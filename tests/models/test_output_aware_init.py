"""init="output_aware" for low-rank latents: its RoPE lag average is what RoPE does, it is exact at full rank, it
never loses to the PCA on its own objective, it lowers every layer's attention-output error where the PCA spends
rank on directions attention does not read, the greedy budget still holds, and a bad value is a clear error."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from kvforge.models.calibration import collect_statistics
from kvforge.models.surgery import SurgeryError, SurgerySettings, compress
from kvforge.models.surgery.linalg import factorize
from kvforge.models.surgery.low_rank import (
    key_output_metric, lag_averaged_rotation, rope_lag_moments, value_output_metric, value_spread,
)

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 6, 3, 8, 48
KV_DIMS = KV_HEADS * HEAD_DIM
QUIET = {"show_progress": False}


def tiny(seed: int = 0, kind: str = "llama"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                        max_position_embeddings=256, initializer_range=0.1)
    model = model_cls(config).eval()
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def loud_but_unread(model):
    """Give every layer key and value directions that are large but that attention barely reads: key pair 0
    of every head scaled up while every query's pair 0 is scaled down (the logit q_0 . k_0 keeps its size), and
    value dims 0-1 of every head scaled up while the o_proj columns reading them are scaled down. A plain PCA
    spends its rank on these directions; the output-aware init sees that they hardly matter."""
    half = HEAD_DIM // 2
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for h in range(KV_HEADS):
                for dim in (h * HEAD_DIM, h * HEAD_DIM + half):
                    a.k_proj.weight[dim] *= 6.0
                for dim in (h * HEAD_DIM, h * HEAD_DIM + 1):
                    a.v_proj.weight[dim] *= 6.0
            for j in range(HEADS):
                for dim in (j * HEAD_DIM, j * HEAD_DIM + half):
                    a.q_proj.weight[dim] /= 6.0
                for dim in (j * HEAD_DIM, j * HEAD_DIM + 1):
                    a.o_proj.weight[:, dim] /= 6.0
    return model


def structured_rows(n: int, length: int, seed: int) -> torch.Tensor:
    """Token ids from a random walk over a sparse bigram table (4 successors per token): text-like repetition
    and structure, without a tokenizer."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, 128, (128, 4), generator=torch.Generator().manual_seed(0))
    out = torch.zeros(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, 128, (n,), generator=g)
    for t in range(1, length):
        out[:, t] = successors[out[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
    return out


def attention_inputs(model, data):
    """Every layer's attention input (the normed hidden state) on `data`, from the original model."""
    inputs = []
    handles = [layer.self_attn.k_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
               for layer in model.model.layers]
    with torch.no_grad():
        model(data)
    for handle in handles:
        handle.remove()
    return inputs


def attention_output(attn, x, key, value, cos, sin):
    """Causal GQA attention of the original layer's q_proj / o_proj over the given pre-RoPE keys and values."""
    batch, length, _ = x.shape
    q = attn.q_proj(x).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    k = key.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = value.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = HEADS // KV_HEADS
    out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def layer_output_errors(model, compressed, data) -> list[float]:
    """Per layer: E|out_compressed - out_original|^2 / E|out_original|^2 of the attention output, both layers
    fed the original model's attention input (so each layer's initialisation is judged on its own)."""
    inputs = attention_inputs(model, data)
    cos, sin = model.model.rotary_emb(inputs[0], torch.arange(data.shape[1])[None])
    state = compressed.state_dict()
    errors = []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            attn, p = model.model.layers[i].self_attn, f"model.layers.{i}.self_attn."

            def linear(name, t):
                bias = state.get(f"{p}{name}.bias")
                return t @ state[f"{p}{name}.weight"].T + (0 if bias is None else bias)

            reference = attention_output(attn, x, attn.k_proj(x), attn.v_proj(x), cos, sin)
            rebuilt = attention_output(attn, x, linear("k_up", linear("k_down", x)), linear("v_up", linear("v_down", x)),
                                       cos, sin)
            errors.append(((rebuilt - reference).pow(2).sum(-1).mean() / reference.pow(2).sum(-1).mean()).item())
    return errors


def low_rank(k_rank: int, v_rank: int) -> dict:
    return {"layers": [{"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": k_rank, "v_rank": v_rank}] * LAYERS}


# ---------------------------------------------------------------------------------------------------


def test_lag_averaged_rotation_is_the_mean_squared_logit_over_causal_pairs():
    # Rotate real queries and a key error with transformers' own RoPE at every causal (query, key) position pair
    # of T tokens: the mean squared logit equals e^T E_D[R^T C R] e with C the queries' second moment.
    g = torch.Generator().manual_seed(0)
    d, length = HEAD_DIM, 12
    inv_freq = 1.0 / (10.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    queries = torch.randn(5, d, generator=g, dtype=torch.float64) + 0.5
    error = torch.randn(d, generator=g, dtype=torch.float64)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    q_rot, _ = apply_rotary_pos_emb(queries[None, :, None].expand(1, 5, length, d), queries[None, :1, None].expand(1, 1, length, d), cos, sin)
    e_rot, _ = apply_rotary_pos_emb(error[None, None, None].expand(1, 1, length, d), error[None, None, None].expand(1, 1, length, d), cos, sin)
    logits = torch.einsum("qtd,sd->qts", q_rot[0], e_rot[0, 0])          # [5 queries, t_q, t_k]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    brute = logits.pow(2)[:, causal].mean()
    weight = lag_averaged_rotation(queries.T @ queries / len(queries), rope_lag_moments(inv_freq, length))
    assert float(error @ weight @ error) == pytest.approx(float(brute), rel=1e-10)


def test_value_metric_is_the_o_proj_output_error_for_independent_or_alike_query_heads():
    g = torch.Generator().manual_seed(1)
    o_weight = torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=g, dtype=torch.float64)
    error = torch.randn(KV_DIMS, generator=g, dtype=torch.float64)
    per_query = error.view(KV_HEADS, HEAD_DIM).repeat_interleave(HEADS // KV_HEADS, 0)   # query head j reads h(j)
    expected = sum((o_weight[:, j * HEAD_DIM:(j + 1) * HEAD_DIM] @ per_query[j]).pow(2).sum() for j in range(HEADS))
    assert float(error @ value_output_metric(o_weight, KV_HEADS, HEAD_DIM, 0.0) @ error) == pytest.approx(float(expected), rel=1e-10)
    # All query heads attending alike: one attention-weighted error per KV head, every cross term counts.
    alike = (o_weight @ per_query.flatten()).pow(2).sum()
    assert float(error @ value_output_metric(o_weight, KV_HEADS, HEAD_DIM, 1.0) @ error) == pytest.approx(float(alike), rel=1e-10)
    half = value_output_metric(o_weight, KV_HEADS, HEAD_DIM, 0.5)
    assert float(error @ half @ error) == pytest.approx(0.5 * float(expected + alike), rel=1e-10)
    with pytest.raises(ValueError, match=r"o_weight must be \[H, n_q \* 8\]"):
        value_output_metric(o_weight[:, :-1], KV_HEADS, HEAD_DIM)


def test_value_spread_is_the_o_proj_output_variance_of_the_values():
    g = torch.Generator().manual_seed(2)
    o_weight = torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=g, dtype=torch.float64)
    values = torch.randn(500, KV_DIMS, generator=g, dtype=torch.float64) @ torch.randn(KV_DIMS, KV_DIMS, generator=g, dtype=torch.float64) + 3.0
    spread = value_spread(o_weight, values.T @ values / len(values), values.mean(0), KV_HEADS, HEAD_DIM)
    centred = (values - values.mean(0)).view(-1, KV_HEADS, HEAD_DIM)
    for j in range(HEADS):
        outputs = centred[:, j // (HEADS // KV_HEADS)] @ o_weight[:, j * HEAD_DIM:(j + 1) * HEAD_DIM].T
        assert float(spread[j]) == pytest.approx(float(outputs.pow(2).sum(1).mean()), rel=1e-10)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("init", ["output_aware", "output_aware_values"])
def test_output_aware_is_exact_at_full_rank(kind, init):
    model = tiny(kind=kind)
    probe = structured_rows(2, 40, seed=7)
    result = compress(model, low_rank(KV_DIMS, KV_DIMS), structured_rows(8, 32, seed=1), settings={**QUIET, "init": init})
    with torch.no_grad():
        assert (result.model(probe).logits - model(probe).logits).abs().max().item() < 1e-4
    assert all(entry["init"] == init for entry in result.report["layers"])


def test_output_aware_never_loses_to_the_pca_on_its_own_objective():
    # On the calibration moments, the weighted error E[e^T M e] of the output-aware factorisation is the least of
    # any rank-r map; the PCA's, evaluated under the same metric, can only be larger.
    model = tiny()
    stats = collect_statistics(model, structured_rows(8, 32, seed=1), show_progress=False)
    attn = model.model.layers[2].self_attn
    inv_freq = model.model.rotary_emb.inv_freq.double()
    q_second, _ = stats.output_moments(2, attn.q_proj.weight)
    metric = key_output_metric(q_second, KV_HEADS, HEAD_DIM, inv_freq, 32)
    second, mean = stats.output_moments(2, attn.k_proj.weight)
    for rank in (2, 6, 12):
        aware = factorize(attn.k_proj.weight, None, second, mean, rank, metric=metric)
        plain = factorize(attn.k_proj.weight, None, second, mean, rank)

        def weighted_error(f):
            residual = torch.eye(KV_DIMS, dtype=torch.float64) - f.up_weight.double() @ f.down_weight.double() @ torch.linalg.pinv(attn.k_proj.weight.double())
            return float(torch.trace(metric @ residual @ second @ residual.T).detach())

        assert weighted_error(aware) == pytest.approx(float(aware.eigenvalues[rank:].sum()), rel=1e-6, abs=1e-12)
        assert weighted_error(aware) <= weighted_error(plain) * (1 + 1e-9)


@pytest.mark.parametrize("init,k_rank,v_rank", [("output_aware", 6, 24), ("output_aware", 24, 12),
                                                ("output_aware", 8, 12), ("output_aware_values", 24, 12),
                                                ("output_aware_values", 24, 6)])
def test_output_aware_lowers_every_layers_attention_output_error(init, k_rank, v_rank):
    # Held-out rows, each layer fed the original's input; the same ranks for both inits.
    model = loud_but_unread(tiny())
    calibration, held_out = structured_rows(16, 64, seed=1), structured_rows(4, 64, seed=2)
    errors = {}
    for name in ("pca", init):
        compressed = compress(model, low_rank(k_rank, v_rank), calibration,
                              settings={**QUIET, "init": name, "context_tokens": 64}).model
        errors[name] = layer_output_errors(model, compressed, held_out)
    for layer, (pca, aware) in enumerate(zip(errors["pca"], errors[init])):
        assert aware < 0.8 * pca, (layer, errors)


def test_greedy_budget_holds_under_the_output_aware_objective():
    model = tiny()
    spec = low_rank(12, 12)
    original = LAYERS * 2 * KV_DIMS * 2
    for init in ("pca", "output_aware", "output_aware_values"):
        result = compress(model, spec, structured_rows(8, 32, seed=1),
                          settings={**QUIET, "init": init, "rank_allocation": "greedy", "budget_fraction": 0.25,
                                    "rank_multiple": 1})  # any rank: the budget spent to the byte
        assert result.report["spec_kv_bytes_per_token"] == original * 0.25
        assert result.report["settings"]["init"] == init


def test_bad_init_names_the_key_and_the_choices():
    with pytest.raises(SurgeryError, match=r"surgery.init='svd' is not one of \('pca', 'output_aware', 'output_aware_values'\)"):
        SurgerySettings.from_dict({"init": "svd"})
    with pytest.raises(SurgeryError, match="did you mean 'init'"):
        SurgerySettings.from_dict({"inti": "pca"})


def partial(rope_dims: int, kv_rank: int) -> dict:
    return {"layers": [{"kv_proj": "low_rank", "rope": "partial", "rope_dims": rope_dims, "kv_rank": kv_rank}] * LAYERS}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_partial_rope_joint_latent_output_aware_equals_the_pca_at_full_rank(kind):
    """At full rank both rebuild [k_nope; v] exactly, so the model is the same; it is not the original, since the
    non-rotary dims lose RoPE (partial RoPE changes the model by design)."""
    model = tiny(kind=kind)
    probe = structured_rows(2, 40, seed=7)
    full = 2 * KV_DIMS - KV_HEADS * 2  # every non-rotary key dim and every value dim
    logits = {}
    for init in ("pca", "output_aware"):
        result = compress(model, partial(2, full), structured_rows(8, 32, seed=1), settings={**QUIET, "init": init})
        assert all(entry["init"] == init for entry in result.report["layers"])
        with torch.no_grad():
            logits[init] = result.model(probe).logits
    torch.testing.assert_close(logits["output_aware"], logits["pca"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["output_aware", "output_aware_values"])
def test_partial_rope_joint_latent_output_aware_beats_the_pca_on_the_models_output(init):
    """Loud but unread key and value directions: the PCA spends the joint latent's rank on them, the output-aware
    metric does not; held-out logits of the compressed model are closer to the original's."""
    model = loud_but_unread(tiny())
    calibration, held_out = structured_rows(16, 64, seed=1), structured_rows(4, 64, seed=2)
    errors = {}
    with torch.no_grad():
        reference = model(held_out).logits
        for name in ("pca", init):
            compressed = compress(model, partial(2, 12), calibration, settings={**QUIET, "init": name}).model
            errors[name] = (compressed(held_out).logits - reference).pow(2).mean().item()
    assert errors[init] < 0.8 * errors["pca"], errors
