"""KVForgeCache(static=True): storage allocated once by the prefill, decode steps with device-side indices only.

Greedy generate() with the static cache equals generate() with the default one for every representation (latent,
partial RoPE, merged heads, window rings with sinks that wrap, kv_from and probs_from readers, 8-bit caches) with
left padding;
its decode step traces as one graph with no breaks and, compiled, runs step after step without recompiling (what a
CUDA graph needs: no host sync, no shape or host value that changes per step); compile_step=True decodes the same
tokens through Inductor, and falls back to the uncompiled step when compiling fails or disagrees; bad settings are
one-line errors."""

import contextlib

import pytest
import torch
from test_modeling_kvforge import build, record_plans
from torch._dynamo.utils import counters

from kvforge.models.modeling_kvforge import KVForgeCache

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PRE = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10}
PARTIAL = {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 6, "kv_rank": 20}
WINDOW = {"attention": "window", "window": 5, "sinks": 2}
EVERY_METHOD = [PRE, WINDOW, {"kv_from": 0}, {"probs_from": 0}, {"kv_proj": "merged_heads", "num_kv_heads": 1},
                PARTIAL, {**WINDOW, **PRE}, {**WINDOW, "kv_from": 1}, {**PRE, "cache_bits": 8},
                {**WINDOW, "cache_bits": 8}, {**PRE, "cache_bits": 4}, {**WINDOW, "cache_bits": 4}]


def prompts():
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("layers, atol", [
    ([layer for layer in EVERY_METHOD if "cache_bits" not in layer], 1e-5),
    # The two caches compute each step's K/V through differently shaped attention (float noise of ~1e-6), and a
    # low-bit cache rounds them: a value that falls on a rounding boundary lands one level apart in the two, which
    # moves this tiny model's logits (scale ~0.6) by up to ~1e-3 (seen: one such flip at step 8 of 12, on one
    # machine and not another; each low-bit layer alone stays within 4e-6). A wrong slot or scale moves them ~0.1.
    (EVERY_METHOD, 3e-3),
], ids=["full-precision caches", "every method with 8- and 4-bit caches"])
def test_static_generate_equals_dynamic_generate(layers, atol):
    """12 new tokens after a 9-token prompt: window layers (5 + 2 sinks) wrap their rings several times."""
    model = build(layers)
    ids, mask = prompts()
    runs, caches = {}, {}
    for static in (False, True):
        caches[static] = model.static_cache(9 + 12) if static else KVForgeCache(model.config)
        with torch.no_grad():
            runs[static] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                          cache=caches[static], return_dict_in_generate=True, output_logits=True,
                                          pad_token_id=0)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for static_logits, dynamic_logits in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-5, atol=atol)
    assert caches[True].get_seq_length() == caches[False].get_seq_length() == 20
    assert torch.equal(caches[True].valid_counts, caches[False].valid_counts)


def test_the_decode_step_is_one_graph_and_compiles_once():
    model = build(EVERY_METHOD)
    ids, mask = prompts()
    eager_cache, compiled_cache = (KVForgeCache(model.config, max_cache_len=16, static=True) for _ in range(2))
    step = model.model._static_decode_step
    with torch.no_grad():
        for cache in (eager_cache, compiled_cache):
            model(ids, attention_mask=mask, cache=cache)
        torch._dynamo.reset()
        counters.clear()
        # One trace for both checks (torch._dynamo.explain traced the step once more to count them): under
        # fullgraph=True a graph break is an error naming its reason, and dynamo's counters give the graphs made
        # over all five steps.
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        for position in range(9, 14):  # the same token at every step: outputs differ only through the cache
            embeds = model.model.embed_tokens(torch.full((3, 1), 7 + position))
            positions, valid = torch.full((3, 1), position), torch.ones(3, 1, dtype=torch.bool)
            expected = eager_cache.static_decode(step, embeds, positions, valid)
            got = compiled_cache.static_decode(compiled, embeds, positions, valid)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        assert (graphs, breaks) == (1, 0), (dict(counters["stats"]), dict(counters["graph_break"]))
    torch._dynamo.reset()


@contextlib.contextmanager
def device_reads(monkeypatch):
    """While open, records each Tensor method that reads a device value back to the host (what a CUDA graph
    capture forbids)."""
    reads = []

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, recording(name))
        yield reads


# Latents of two rank pairs in 8 bits, a window ring over latents, a kv_from reader: the compiled step meets rank
# dims that differ between layers, the fused slot write and two layouts.
COMPILED = [{**PRE, "cache_bits": 8}, {**WINDOW, **PRE, "k_rank": 8}, {"kv_from": 0}]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def static_tensors(cache: KVForgeCache) -> dict[str, int]:
    """Where each tensor a captured decode step reads lives: storage, slot bookkeeping, counters."""
    where = {"valid_counts": cache.valid_counts.data_ptr()}
    for i, storage in enumerate(cache.layers):
        where.update({f"layer {i} {name}": t.data_ptr() for name, t in storage.tensors.items()})
    for key, layout in cache.layouts.items():
        for name in ("token_index", "positions", "length_on_device"):
            if getattr(layout, name) is not None:
                where[f"{key} {name}"] = getattr(layout, name).data_ptr()
    return where


def test_a_reset_static_cache_generates_again_in_place():
    """KVForgeCache.reset() on a static cache: the next generate() (new prompts, other padding) gives what a fresh
    static cache gives, with every tensor where it was (a CUDA graph captured in the first call replays them by
    address in the next: on a GPU a moved tensor would be read stale, not refused)."""
    model = build(EVERY_METHOD)
    ids, mask = prompts()
    cache = model.static_cache(9 + 12)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=cache, **kwargs)
        where = static_tensors(cache)
        cache.reset()
        assert cache.get_seq_length() == 0 and not cache.is_initialized
        ids = torch.randint(3, 100, ids.shape, generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        again = model.generate(ids, attention_mask=mask, cache=cache, **kwargs)
        fresh = model.generate(ids, attention_mask=mask, cache=model.static_cache(9 + 12), **kwargs)
    assert static_tensors(cache) == where
    assert torch.equal(again.sequences, fresh.sequences)
    for again_logits, fresh_logits in zip(again.logits, fresh.logits):
        # the low-bit layers' rounding boundaries, as in test_static_generate_equals_dynamic_generate
        torch.testing.assert_close(again_logits, fresh_logits, rtol=1e-5, atol=3e-3)
    assert cache.get_seq_length() == 20  # 9 + 12 - 1: the last token is never fed back


def test_a_reset_static_caches_prefill_without_padding_shares_one_mask_row(monkeypatch):
    """The next generate() on a reset static cache, no padding: its prefill attends under one mask row for the batch
    in every layout, rings included, whose cleared slots are empty in every row alike (per row, a window's mask
    was [B, 1, 1, T, W + T]: at 128 x 16k SDPA asked 68 GiB for it); the tokens are a fresh cache's."""
    plans = record_plans(monkeypatch)
    model = build([layer for layer in EVERY_METHOD if "cache_bits" not in layer])
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(4))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = model.static_cache(9 + 6)
    with torch.no_grad():
        model.generate(ids, cache=cache, **kwargs)
        cache.reset()
        plans.clear()
        again = model.generate(ids, cache=cache, **kwargs)
        prefills = [(ring, p) for ring, p in plans if p.query_index.shape[1] > 1]
        fresh = model.generate(ids, cache=model.static_cache(9 + 6), **kwargs)
    assert any(ring for ring, _ in prefills) and all(p.mask.shape[0] == 1 for _, p in prefills)
    assert torch.equal(again, fresh)


def test_a_cropped_static_cache_decodes_where_a_dynamic_one_does():
    """crop() (assisted decoding's rollback) on a static cache: its next decode steps write the slots after the
    kept tokens (the step's slot index lives on the device), so that decoding can fill the cache to its capacity
    again (the slot order itself does not change attention: a step that kept counting from before the crop ran
    past the storage), and attend as a dynamic cache's do."""
    model = build([PRE, {**PRE, "cache_bits": 8}, {"kv_from": 0}])
    ids, mask = prompts()
    outputs = {}
    with torch.no_grad():
        for static in (False, True):
            cache = model.static_cache(9 + 6) if static else KVForgeCache(model.config)
            model(ids, attention_mask=mask, cache=cache)
            for step in range(3):
                model(torch.full((3, 1), 7 + step), attention_mask=torch.ones(3, 10 + step, dtype=torch.long),
                      cache=cache)
            cache.crop(10)  # keeps the prompt and the first new token
            outputs[static] = [model(torch.full((3, 1), 20 + step), cache=cache,
                                     attention_mask=torch.ones(3, 11 + step, dtype=torch.long)).logits
                               for step in range(5)]  # to the capacity, 9 + 6
    for static_logits, dynamic_logits in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-5, atol=3e-3)


@pytest.mark.parametrize("kernels", ["off", "triton"])
def test_a_compiled_decode_step_generates_what_the_uncompiled_one_does(kernels, monkeypatch, fresh_dynamo):
    """KVForgeCache(compile_step=True): the step through torch.compile (Inductor on this CPU), with the PyTorch
    attention or the Triton kernels (interpreted) launched between compiled parts; also what generate(...,
    cache_implementation="static") builds (transformers' convention: a static cache, a compiled step)."""
    monkeypatch.setenv("KVFORGE_KERNELS", kernels)
    model = build(COMPILED)
    ids, mask = prompts()
    runs = {}
    for compiled in (False, True):
        with torch.no_grad():
            runs[compiled] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                            cache=model.static_cache(9 + 6, compile_step=compiled),
                                            return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    assert callable(model.model._compiled_decode_step)  # compiled, checked, kept
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for compiled_logits, logits in zip(runs[True].logits, runs[False].logits):
        torch.testing.assert_close(compiled_logits, logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             cache_implementation="static", return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    assert cache.static and cache.compile_step
    assert torch.equal(out.sequences, runs[False].sequences)


def test_the_compiled_step_reads_the_device_only_on_its_first_call(monkeypatch, fresh_dynamo):
    """KVForgeCache._graph_step runs one step object twice: a warm-up, where the first compiled call compiles and
    checks itself against the uncompiled step (reading the difference back), then the CUDA graph capture, where
    nothing may read the device. The same object's second call must go straight to the compiled step, with no
    recompile."""
    model = build(COMPILED)
    ids, mask = prompts()
    cache = model.static_cache(16, compile_step=True)
    counters.clear()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        step = model.model._decode_step(cache)
        inputs = (model.model.embed_tokens(torch.full((3, 1), 7)), torch.full((3, 1), 9),
                  torch.ones(3, 1, dtype=torch.bool), cache)
        first = step(*inputs)  # the warm-up: compiles, checks
        assert callable(model.model._compiled_decode_step)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        with device_reads(monkeypatch) as reads:
            second = step(*inputs)  # the capture
        assert reads == []
        # Nor does it compile again (a compile inside a capture would run the compiler's own device work there).
        assert counters["stats"]["unique_graphs"] == graphs
        torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_a_compiled_step_that_fails_or_disagrees_leaves_the_uncompiled_one(failure, monkeypatch, fresh_dynamo,
                                                                         caplog):
    """Whatever the installed compiler does, generate() decodes what the uncompiled step decodes: a compile error,
    or a compiled step off by more than fused rounding (here 1% of the hidden states), is one warning and the
    model's uncompiled step from then on."""
    model = build(COMPILED)
    ids, mask = prompts()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                  cache=model.static_cache(15), pad_token_id=0)

    def broken_compile(step, **kwargs):
        def run(*args):
            if failure == "raises":
                raise RuntimeError("backend compiler failed")
            return step(*args) * 1.01
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with torch.no_grad(), caplog.at_level("WARNING"):
        for _ in range(2):  # the second generate() does not try again
            got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 cache=model.static_cache(15, compile_step=True), pad_token_id=0)
            assert torch.equal(got, expected)
    assert model.model._compiled_decode_step is False
    warnings = [r.getMessage() for r in caplog.records if "decoding uncompiled" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert ("backend compiler failed" if failure == "raises" else "relative difference 1.00e-02") in warnings[0]


def test_forward_reads_the_device_only_to_learn_a_prefills_padding(monkeypatch):
    """forward() with an attention_mask asks the device whether any token is padding (so that a prefill without any
    shares one mask row across the batch), but never in a one-token step: a CUDA graph cannot read the device."""
    model = build(EVERY_METHOD)
    ids, mask = prompts()
    cache = model.static_cache(16, cuda_graphs=False)
    with torch.no_grad(), device_reads(monkeypatch) as reads:
        model(ids, attention_mask=torch.ones_like(mask), cache=cache)
        assert reads
        reads.clear()
        for step in range(3):
            model(torch.full((3, 1), 7 + step), attention_mask=torch.ones(3, 10 + step, dtype=torch.long), cache=cache)
        assert reads == []


def test_bad_settings_are_one_line_errors():
    config = build([PRE]).config
    with pytest.raises(ValueError, match=r"static=True\) needs max_cache_len .* \(got max_cache_len=None"):
        KVForgeCache(config, static=True)
    with pytest.raises(ValueError, match="no PyramidKV"):
        KVForgeCache(config, max_cache_len=8, static=True, pyramid={"budget": 4})
    with pytest.raises(ValueError, match=r"compile_step=True\) needs static=True"):
        KVForgeCache(config, compile_step=True)
