"""The static cache's fused low-bit write (kernels/latent_attention.py quantize_into_slot, through dispatch's
fused_slot_write) against modeling_kvforge.quantize_into_static_slot, on CPU through Triton's interpreter: the same
bytes in the cache and the same scales, bit for bit, for 8 and 4 bits, every float dtype, per-row and shared slots,
rounding ties and an all-zero token; and a static generate() with the kernel equal to one without it."""

import os

import pytest
from kernel_generation import tiny_model
import torch

from kvforge.kernels import dispatch
from kvforge.kernels.latent_attention import quantize_into_slot
from kvforge.models.modeling_kvforge import quantize_into_static_slot

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="kernel tests run tensors on CPU through Triton's interpreter")


def storages(batch, slots, cols, bits, dtype):
    width = cols // 2 if bits == 4 else cols
    stored = torch.zeros(batch, slots, width, dtype=torch.uint8 if bits == 4 else torch.int8)
    return stored, torch.zeros(batch, slots, 1, dtype=dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_row", [True, False])
def test_the_fused_write_stores_the_bytes_and_scales_the_reference_stores(bits, dtype, per_row):
    batch, slots, cols = 3, 7, 22
    g = torch.Generator().manual_seed(bits + per_row)
    value = (torch.randn(batch, 1, cols, generator=g) * 3).to(dtype)
    top = (1 << (bits - 1)) - 1
    value[1, 0, :6] = torch.tensor([top, 2.5, -3.5, 0.5, 1.5, -0.5], dtype=dtype)  # scale 1: ties to even
    value[2] = 0  # an all-zero token: scale at the dtype's tiny, levels 0
    slot = torch.tensor([4, 0, 6]) if per_row else torch.tensor([5])
    rows = torch.arange(batch) if per_row else None
    expected, got = storages(batch, slots, cols, bits, dtype), storages(batch, slots, cols, bits, dtype)
    quantize_into_static_slot(value, *expected, 1, slot, rows, bits)
    quantize_into_slot(value, *got, slot, bits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].abs().sum() > 0  # something was written


def test_the_dispatch_sends_a_latent_write_to_the_kernel_and_anything_else_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "quantize_into_slot", lambda *args: calls.append("kernel"))
    write = dispatch.fused_slot_write(lambda *args: calls.append("reference"))
    value, (stored, scales) = torch.randn(2, 1, 8), storages(2, 4, 8, 8, torch.float32)
    monkeypatch.setenv("KVFORGE_KERNELS", "triton")
    write(value, stored, scales, 1, torch.tensor([1]), None, 8)
    dense = torch.randn(2, 3, 1, 8)  # a dense K / V [B, K, 1, D]: slots along dim 2, rounded over K x D
    write(dense, torch.zeros(2, 3, 4, 8, dtype=torch.int8), torch.zeros(2, 1, 4, 1), 2, torch.tensor([1]), None, 8)
    monkeypatch.setenv("KVFORGE_KERNELS", "off")
    write(value, stored, scales, 1, torch.tensor([1]), None, 8)
    assert calls == ["kernel", "reference", "reference"]


@pytest.mark.parametrize("cache_bits", [8, 4])
def test_static_generate_with_the_fused_write_equals_generate_without_it(cache_bits, monkeypatch):
    layer = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": cache_bits}
    model = tiny_model([layer, dict(layer, k_rank=8)])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(cache_bits))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    writes = []
    kernel = dispatch.quantize_into_slot
    monkeypatch.setattr(dispatch, "quantize_into_slot", lambda *args: writes.append(1) or kernel(*args))
    out = {}
    for mode in ("off", "triton"):
        monkeypatch.setenv("KVFORGE_KERNELS", mode)
        cache = model.static_cache(9 + 5, cuda_graphs=False)
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0)
        out[mode] = tokens, {(i, n): t.clone() for i, n, t in cache.named_tensors()}
    assert len(writes) == 2 * 2 * 4  # two latents per layer, two layers, four decode steps (the prefill writes its own)
    assert torch.equal(out["off"][0], out["triton"][0])
    assert out["off"][1].keys() == out["triton"][1].keys()
    # Layer 0's latents come from the embeddings alone: the same bytes. Later layers' come after an attention the
    # kernel mode computes in the latent kernel (float noise of ~1e-6), so a level may differ there.
    assert all(torch.equal(out["off"][1][k], out["triton"][1][k]) for k in out["off"][1] if k[0] == 0)
    from kvforge.models.modeling_kvforge import dequantize_slots

    for name in ("k_latent", "v_latent"):
        values = [dequantize_slots(run[1][(1, name)], run[1][(1, name + "_scale")]).float() for run in out.values()]
        scale = out["off"][1][(1, name + "_scale")].float()
        assert ((values[0] - values[1]).abs() <= scale * 1.01 + 1e-6).all()
