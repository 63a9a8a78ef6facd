"""The training (no cache, several tokens) attention paths against the eager per-representation references.

Training attends through `kv_attention` for every representation: latent caches are up-projected to whole K / V
once per step (`SharedKV.dense_kv`) and SDPA runs with is_causal when no padding or window cuts in. The reference
here is the pre-SDPA path: each representation's own function (`pre_rope_latent_attention`,
`partial_rope_attention`, both unabsorbed and absorbed) with the plan's full [B, 1, 1, T, S] mask and an explicit
softmax. Values and gradients are compared in fp32 at window boundaries, with sinks, with left padding and for
kv_from / probs_from readers. Tiny fp32 models (hidden 64, 4 q heads, 2 kv heads, head_dim 16), seeded.
"""

import pytest
import torch
import torch.nn.functional as F

# The same tiny models as the modeling tests (biases drawn non-zero, per-head non-contiguous rotary dims);
# tests/models is on pytest's import path.
from test_modeling_kvforge import HEAD_DIM, build

from kvforge.models import modeling_kvforge as mk
from kvforge.models.modeling_kvforge import (
    KVForgeAttention,
    KeyRotary,
    kv_attention,
    partial_rope_attention,
    partial_rope_dims,
    partial_rope_kv,
    partial_rope_query,
    pre_rope_latent_attention,
    pre_rope_latent_kv,
    visibility_mask,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TOL = 2e-5
# window 5 with 2 sinks over 14 tokens: rows 0-4 see everything before them, later rows lose keys at the window's
# edge while keeping the two sinks
WINDOW = {"attention": "window", "window": 5, "sinks": 2}
PRE = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10}
PARTIAL = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 6, "kv_rank": 20}
SHARED_ROPE = {**PARTIAL, "rope_shared": True}
MERGED = {"kv_proj": "merged_heads", "num_kv_heads": 1}
SPECS = {
    "dense": [{}, WINDOW],
    "merged_heads": [MERGED, {**WINDOW, **MERGED}],
    "pre_rope_latent": [PRE, {**WINDOW, **PRE}],
    "partial": [PARTIAL, {**WINDOW, **PARTIAL}],
    "partial_shared": [SHARED_ROPE, {**WINDOW, **SHARED_ROPE}],
    # kv_from readers of each latent kind, in and out of a window; a probs_from reader of a latent layer
    "kv_sharing": [PARTIAL, {"kv_from": 0}, {**WINDOW, **PRE}, {**WINDOW, "kv_from": 2},
                   {**WINDOW, "probs_from": 2, "kv_proj": "low_rank", "v_rank": 8}, {"probs_from": 0}],
}


def reference_attend(self, shared, query, cos, sin, plan, need_probs, dropout, handoff=None):
    """The pre-SDPA training path: each representation's own function, full mask, explicit softmax."""
    producer = shared.producer
    batch, heads, length, dim = query.shape
    query = query.view(batch, producer.num_kv_heads, heads // producer.num_kv_heads, length, dim)
    t = shared.tensors
    if shared.representation == "partial_shared":  # query [.., D + Dr]: q_proj's dims, then q_rope's
        query_nope, query_rope = query.split([HEAD_DIM, dim - HEAD_DIM], dim=-1)
        cos_r, sin_r = mk.SharedRopeLatent.rope_tables(producer, cos, sin)
        query_rope = mk.apply_rotary(query_rope, cos_r[:, None, None], sin_r[:, None, None])
        return partial_rope_attention(query_rope, query_nope, t["k_rope"], t["kv_latent"], producer.k_up,
                                      producer.v_up, plan.mask, self.scaling, need_probs=need_probs, absorb=False)
    rotated = mk.apply_rotary(query, cos[:, None, None], sin[:, None, None])
    if shared.representation == "kv":
        return kv_attention(rotated, t["key"], t["value"], plan.mask, self.scaling, need_probs=need_probs)
    if shared.representation == "pre_rope_latent":
        return pre_rope_latent_attention(rotated, t["k_latent"], t["v_latent"], producer.k_up, producer.v_up,
                                         plan.key_rotary(), plan.mask, self.scaling, need_probs=need_probs,
                                         absorb=False)
    rope_dims, nope_dims = partial_rope_dims(producer.rope_index, dim)
    return partial_rope_attention(mk._gather_dims(rotated, rope_dims), mk._gather_dims(query, nope_dims),
                                  t["k_rope"], t["kv_latent"], producer.k_up, producer.v_up, plan.mask,
                                  self.scaling, need_probs=need_probs, absorb=False)


def inputs(padded: bool, batch=3, length=14, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:  # left padding of different widths; row 0 has none
        mask[1, :3] = 0
        mask[2, :6] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    loss = (logits * weights * mask[..., None]).sum()  # padded queries' outputs are never used
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach() * mask[..., None], grads


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_training_forward_and_gradients_equal_the_reference(method, padded, implementation, monkeypatch):
    ids, mask = inputs(padded)
    model = build(SPECS[method], implementation).train()
    logits, grads = loss_and_grads(model, ids, mask)
    with monkeypatch.context() as patch:
        patch.setattr(KVForgeAttention, "attend", reference_attend)
        ref_logits, ref_grads = loss_and_grads(model, ids, mask)
    assert (logits - ref_logits).abs().max() <= TOL * ref_logits.abs().max()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert (grad - ref_grads[name]).abs().max() <= 1e-4 * scale, name


def rotary_for(positions):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    return KeyRotary(positions, inv_freq, 1.0, torch.float32)


@pytest.mark.parametrize("window,sinks,padded", [(None, 0, False), (None, 0, True), (4, 0, False), (4, 2, True)])
def test_latent_functions_through_sdpa_equal_their_absorbed_forms(window, sinks, padded):
    """Function level: whole K / V from the latents then SDPA (values and gradients) equal the representation's
    absorbed form, which never rebuilds K / V."""
    torch.manual_seed(0)
    batch, kv_heads, group, length = 3, 2, 2, 11
    ids, attention = inputs(padded, batch=batch, length=length)
    index = mk._token_index(attention.bool(), torch.zeros(batch, dtype=torch.long))
    mask = visibility_mask(index, index, window, sinks)
    positions = torch.arange(length).expand(batch, -1)
    key_rotary = rotary_for(positions)
    cos, sin = key_rotary.tables()
    query = torch.randn(batch, kv_heads, group, length, HEAD_DIM, requires_grad=True)
    k_latent = torch.randn(batch, length, 12, requires_grad=True)
    v_latent = torch.randn(batch, length, 10, requires_grad=True)
    k_up, v_up = torch.nn.Linear(12, kv_heads * HEAD_DIM, bias=False), torch.nn.Linear(10, kv_heads * HEAD_DIM)
    rotate = lambda: mk.apply_rotary(query, cos[:, None, None], sin[:, None, None])  # noqa: E731
    leaves = [query, k_latent, v_latent, k_up.weight, v_up.weight, v_up.bias]

    def run(fn):
        out = fn()
        grads = torch.autograd.grad((out * attention[:, None, None, :, None]).square().sum(), leaves)
        return out.detach() * attention[:, None, None, :, None], grads

    causal = window is None and not padded
    sdpa_mask = mask[:1] if not padded else mask
    fast = run(lambda: kv_attention(rotate(), *pre_rope_latent_kv(k_latent, v_latent, k_up, v_up, key_rotary),
                                    sdpa_mask, HEAD_DIM ** -0.5, use_sdpa=True, causal=causal)[0])
    ref = run(lambda: pre_rope_latent_attention(rotate(), k_latent, v_latent, k_up, v_up, key_rotary, mask,
                                                HEAD_DIM ** -0.5, absorb=True)[0])
    for a, b in zip((fast[0], *fast[1]), (ref[0], *ref[1])):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()

    rope_index = torch.stack([torch.randperm(HEAD_DIM // 2)[:3].sort().values for _ in range(kv_heads)])
    rope_dims, nope_dims = partial_rope_dims(rope_index, HEAD_DIM)
    kv_latent = torch.randn(batch, length, 20, requires_grad=True)
    k_rope = torch.randn(batch, kv_heads, length, 6, requires_grad=True)
    k_up_n, v_up_p = torch.nn.Linear(20, kv_heads * (HEAD_DIM - 6), bias=False), torch.nn.Linear(20, kv_heads * HEAD_DIM)
    leaves = [query, kv_latent, k_rope, k_up_n.weight, v_up_p.weight, v_up_p.bias]
    fast = run(lambda: kv_attention(partial_rope_query(query, rotate(), rope_index),
                                    *partial_rope_kv(k_rope, kv_latent, k_up_n, v_up_p, rope_index, HEAD_DIM),
                                    sdpa_mask, HEAD_DIM ** -0.5, use_sdpa=True, causal=causal)[0])
    ref = run(lambda: partial_rope_attention(mk._gather_dims(rotate(), rope_dims), mk._gather_dims(query, nope_dims),
                                             k_rope, kv_latent, k_up_n, v_up_p, mask, HEAD_DIM ** -0.5,
                                             absorb=True)[0])
    for a, b in zip((fast[0], *fast[1]), (ref[0], *ref[1])):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_training_step_uses_flash_friendly_sdpa_and_materialises_only_shared_probabilities(monkeypatch):
    """Without padding: global layers call SDPA with is_causal and no mask, window layers with one row of mask
    for the whole batch (tiled over each KV head's query heads); the explicit softmax runs only in layers whose probabilities a probs_from layer reads;
    a kv_from reader reuses its producer's up-projected K / V (k_up / v_up run once per producer)."""
    layers = SPECS["kv_sharing"]
    model = build(layers, "sdpa").train()
    sdpa = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    softmax = count_calls(monkeypatch, mk, "_masked_softmax")
    up_calls = {i: 0 for i in (0, 2)}
    for i in up_calls:
        for up in (model.model.layers[i].self_attn.k_up, model.model.layers[i].self_attn.v_up):
            up.register_forward_hook(lambda *_, i=i: up_calls.__setitem__(i, up_calls[i] + 1))
    ids, mask = inputs(padded=False)
    model(ids, attention_mask=mask, use_cache=False).logits.sum().backward()

    probs_sources = {layer["probs_from"] for layer in layers if layer.get("probs_from") is not None}  # {0, 2}
    attending = [i for i, layer in enumerate(layers) if layer.get("probs_from") is None]
    assert len(softmax) == len(probs_sources)
    assert len(sdpa) == len(attending) - len(probs_sources)  # layers 1 and 3
    global_call, window_call = sdpa  # layer 1 reads layer 0 (global), layer 3 reads layer 2 (window 5)
    assert global_call["is_causal"] and "attn_mask" not in global_call
    # The window layer's one mask row serves the batch, tiled over a KV head's G query heads (G x T query rows of
    # one head), and its keys are the KV heads' own, not expanded to every query head.
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    assert window_call["attn_mask"].shape == (1, 1, group * ids.shape[1], ids.shape[1])
    assert up_calls == {0: 2, 2: 2}  # one k_up and one v_up call each, whatever reads them


def recorded_masks(monkeypatch):
    """The shapes of every visibility mask built from here on."""
    shapes = []
    original = mk.visibility_mask

    def recorded(*args, **kwargs):
        mask = original(*args, **kwargs)
        shapes.append(tuple(mask.shape))
        return mask

    monkeypatch.setattr(mk, "visibility_mask", recorded)
    return shapes


@pytest.mark.parametrize("attention_mask", ["ones", "none"])
def test_a_prefill_without_padding_through_a_cache_builds_no_per_row_mask(monkeypatch, attention_mask):
    """generate()'s prefill without padding attends as a training step does (global: SDPA with is_causal, window:
    one mask row for the batch): a [B, 1, 1, T, S] mask (and an int64 [B, T, S] in it) ran a 32k-token prompt at
    batch 32 out of memory on the H200. The window ring (5 + 2 sinks, 14 tokens: it wraps) holds what a prefill
    under per-row masks writes (one padding column in front of every row takes that path)."""
    model = build([{}, WINDOW], "sdpa")
    ids, ones = inputs(padded=False)
    batch, length = ids.shape
    sdpa = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    shapes = recorded_masks(monkeypatch)
    cache = mk.KVForgeCache(model.config)
    with torch.no_grad():
        logits = model(ids, attention_mask=ones if attention_mask == "ones" else None, cache=cache).logits
    global_call, window_call = sdpa
    assert global_call["is_causal"] and "attn_mask" not in global_call
    group = model.config.num_attention_heads // model.config.num_key_value_heads  # the row tiled over G heads
    assert window_call["attn_mask"].shape == (1, 1, group * length, length)
    assert shapes == [(1, 1, 1, length, length)]  # the window layout's row; the global layout needs none

    padded_ids, padded = F.pad(ids, (1, 0)), F.pad(ones, (1, 0))
    reference_cache = mk.KVForgeCache(model.config)
    with torch.no_grad():
        reference = model(padded_ids, attention_mask=padded, position_ids=(padded.cumsum(-1) - 1).clamp_min(0),
                          cache=reference_cache).logits
    assert shapes[-1][0] == batch  # the reference did take the per-row path
    torch.testing.assert_close(logits, reference[:, 1:], rtol=0, atol=TOL)
    ring, reference_ring = cache.layouts[(5, 2)], reference_cache.layouts[(5, 2)]
    assert torch.equal(ring.token_index, reference_ring.token_index)
    assert torch.equal(ring.positions, reference_ring.positions)
    assert ring.token_index[0].tolist() == [0, 1, 12, 13, 9, 10, 11]  # sinks, then the last 5 tokens, wrapped
    for name, stored in cache.layers[1].tensors.items():
        torch.testing.assert_close(stored, reference_cache.layers[1].tensors[name], rtol=0, atol=TOL)


def test_layers_compiled_one_at_a_time_compile_once_not_per_forward():
    """training.compile_scope=layers compiles each decoder layer. Each forward makes new slot plans and a new
    handoff, which the layers take as arguments: nothing of theirs may become a guard on the object (an id()
    did), or every step would recompile every layer until dynamo gives up and runs them eagerly."""
    from torch._dynamo.utils import counters

    from kvforge.trainer.runtime import compile_in_place

    import torch._dynamo.config as dynamo_config

    mixed = [PRE, WINDOW, {"kv_from": 0}, {"probs_from": 0}, MERGED, PARTIAL, {**WINDOW, **PARTIAL},
             {**PRE, "cache_bits": 8}, {**WINDOW, "cache_bits": 4}, {**PRE, "k_rank": 8, "v_rank": 6, "cache_bits": 4}]
    ranked = [{**PRE, "k_rank": 4 + i, "v_rank": 6 + i} for i in range(10)]  # greedy allocation's many ranks
    ids = torch.randint(0, 100, (2, 16))
    with dynamo_config.patch(force_parameter_static_shapes=True, force_nn_module_property_static_shapes=True):
        for layers in (mixed, ranked):
            model = build(layers).train()
            expected = model(input_ids=ids, use_cache=False).logits
            torch._dynamo.reset()
            counters.clear()
            compile_in_place(model, "layers", backend="eager")
            graphs = []
            for _ in range(3):
                logits = model(input_ids=ids, use_cache=False).logits
                torch.testing.assert_close(logits, expected)
                graphs.append(counters["stats"]["unique_graphs"])
            assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], graphs
            if layers is ranked:
                # One graph with a symbolic rank for all ten layers: not one per rank, nor a static one for the
                # first layer (its ranks are marked dynamic before the first trace, and the step's SDPA mask and key
                # tables are built before the layers, not by the first of them).
                assert graphs[0] == 1, graphs
                logits.sum().backward()
                assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            torch._dynamo.reset()


def test_the_trainers_evaluation_runs_compiled_layers_eagerly():
    """Evaluation under no_grad would compile a second graph per compiled layer (the step-0 evaluation of a GPU
    recipe took 44-60 s, almost all of it compiling, session 13); trainer.train.evaluate runs them eagerly."""
    import math

    from torch._dynamo.utils import counters

    from kvforge.trainer.config import Config
    from kvforge.trainer.runtime import compile_in_place
    from kvforge.trainer.train import evaluate

    model = build([PRE, WINDOW]).train()
    rows = torch.randint(0, 100, (4, 16))

    class Engine:
        module = model
        eval, train = model.eval, model.train

    torch._dynamo.reset()
    counters.clear()
    compile_in_place(model, "layers", backend="eager")
    result = evaluate(Engine(), rows, Config(), 0, 1, "cpu")
    assert math.isfinite(result["perplexity"]) and model.training
    assert counters["stats"]["unique_graphs"] == 0
    with torch.no_grad():  # the same forward outside evaluate: compiled
        model.eval()(input_ids=rows[:2], use_cache=False)
    assert counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()


def test_padding_or_a_cache_keeps_the_full_mask():
    model = build(SPECS["dense"], "sdpa")
    ids, mask = inputs(padded=True)
    index = mk._token_index(mask.bool(), torch.zeros(3, dtype=torch.long))
    plan = mk.SlotLayout(None, 0).plan(index, torch.arange(ids.shape[1]).expand(3, -1))
    got, causal = plan.sdpa_mask()
    assert got is plan.mask and got.shape[0] == 3 and not causal
    assert plan.sdpa_mask()[0] is got  # decided once per plan and step
    full = torch.ones_like(mask)
    full_index = mk._token_index(full.bool(), torch.zeros(3, dtype=torch.long))
    plan = mk.SlotLayout(3, 1).plan(full_index, torch.arange(ids.shape[1]).expand(3, -1), no_padding=True)
    got, causal = plan.sdpa_mask()
    assert got.shape[0] == 1 and not causal  # a window of 3 cuts into 14 tokens
    # A cache that holds tokens (a later prefill chunk): never is_causal, whose corner would sit top left; one mask
    # row when no token, cached or new, is padding (the model's no_padding covers the whole attention mask), each
    # row's own otherwise.
    layout = mk.SlotLayout(None, 0)
    layout.commit(layout.plan(full_index[:, :4], torch.arange(4).expand(3, -1)), torch.arange(4).expand(3, -1))
    for no_padding, rows in ((True, 1), (False, 3)):
        plan = layout.plan(full_index[:, 4:] + 4, torch.arange(4, 14).expand(3, -1), no_padding=no_padding)
        got, causal = plan.sdpa_mask()
        assert got.shape == (rows, 1, 1, 10, 14) and not causal
        assert torch.equal(got[0, 0, 0], torch.arange(14)[None, :] <= torch.arange(4, 14)[:, None])
    with torch.no_grad():  # and the model's own uses of it agree with eager (the big test covers gradients)
        eager = build(SPECS["dense"], "eager")(ids, attention_mask=mask).logits
        assert ((model(ids, attention_mask=mask).logits - eager) * mask[..., None]).abs().max() <= TOL


def test_the_training_forward_compiles_to_one_graph_whatever_the_layer_shapes():
    """torch.compile of a training forward (no cache, no attention mask) traces the whole model as one graph, for
    layers of different ranks and every representation. On the H200, a device sync in the mask choice and the
    ring-slot bookkeeping of window layers split the graph per layer; dynamo then recompiled the attention once
    per layer shape, hit its limit of 8 and the run crashed."""
    from torch._dynamo.utils import counters

    mixed = [PRE, WINDOW, {"kv_from": 0}, {"probs_from": 0}, MERGED, PARTIAL, {**WINDOW, **PARTIAL},
             {**PRE, "cache_bits": 8}, {**WINDOW, "cache_bits": 4}, {**PRE, "k_rank": 8, "v_rank": 6, "cache_bits": 4}]
    ranked = [{**PRE, "k_rank": 4 + i, "v_rank": 6 + i} for i in range(10)]  # ten shapes: more than 8
    ids = torch.randint(0, 100, (2, 16))
    for layers in (mixed, ranked):
        model = build(layers).train()
        torch._dynamo.reset()
        counters.clear()
        # One trace for both checks (torch._dynamo.explain traced the forward once more to count them): under
        # fullgraph=True a graph break is an error naming its reason, and dynamo's counters give the graphs made.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        assert (graphs, breaks) == (1, 0), dict(counters["graph_break"])
        torch._dynamo.reset()
