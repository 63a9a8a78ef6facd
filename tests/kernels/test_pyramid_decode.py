"""PyramidKV caches through the decode kernels, on CPU through Triton's interpreter: after the prefill each cache
group keeps its own number of prompt tokens (the pyramid schedule's ragged budgets), compacted into smaller
tensors whose slots hold out-of-order positions, sinks and the recent window; every decode step's kernels read
those lengths and must decode what the PyTorch path decodes over the same caches."""

import os

import pytest
from kernel_generation import record_kernel_calls, tiny_model
import torch

from kvforge.models.pyramid import PyramidSettings, layer_budgets, new_pyramid_cache

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")

# A dense layer with a kv_from reader, pre-RoPE latents in 8 bits, partial-RoPE latents, merged heads: each cache
# group compacts on its own, to its own budget.
LAYERS = [{}, {"kv_from": 0},
          {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 8},
          {"kv_proj": "low_rank", "rope": "partial", "rope_dims": 8, "kv_rank": 24},
          {"kv_proj": "merged_heads", "num_kv_heads": 1}]
KERNELS = ("gqa_decode_attention", "latent_decode_attention", "partial_rope_decode_attention")


def test_ragged_pyramid_budgets_decode_through_the_kernels_as_through_pytorch(monkeypatch):
    model = tiny_model(LAYERS)
    ids = torch.randint(3, 128, (2, 61), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0  # left padding in row 1
    settings = dict(budget=24, window=4, sinks=2, schedule="pyramid")
    groups = 4  # cache groups: layers 0 (+ its reader), 2, 3, 4
    budgets = layer_budgets(PyramidSettings(**settings), groups)
    assert len(set(budgets)) == groups  # every group its own length
    runs, caches = {}, {}
    for mode in ("off", "triton"):
        monkeypatch.setenv("KVFORGE_KERNELS", mode)
        calls = {name: record_kernel_calls(monkeypatch, name) for name in KERNELS}
        caches[mode] = new_pyramid_cache(model, **settings, max_cache_len=61 + 8)
        with torch.no_grad():
            runs[mode] = model.generate(ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                                        return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                                        past_key_values=caches[mode])
        if mode == "off":
            assert all(len(c) == 0 for c in calls.values())
        else:  # every decode step of every layer through a kernel: dense + reader + merged, latent, partial
            assert {name: len(c) for name, c in calls.items()} == {KERNELS[0]: 3 * 7, KERNELS[1]: 7, KERNELS[2]: 7}
        monkeypatch.undo()
    assert sorted(caches["triton"].pyramid.kept.values()) == sorted(budgets)
    assert caches["triton"].pyramid.kept == caches["off"].pyramid.kept
    assert torch.equal(runs["triton"].sequences, runs["off"].sequences)
    for with_kernel, without in zip(runs["triton"].logits, runs["off"].logits):
        torch.testing.assert_close(with_kernel, without, atol=1e-4, rtol=1e-4)
