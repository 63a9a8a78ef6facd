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


def storages(batch, slots, cols, bits, dtype, heads=None):
    """A latent's cache [B, S, R] and scales [B, S, 1]; with heads, a head-major one [B, H, S, D] and [B, 1, S, 1]."""
    width = cols // 2 if bits == 4 else cols
    kind = torch.uint8 if bits == 4 else torch.int8
    if heads is None:
        return torch.zeros(batch, slots, width, dtype=kind), torch.zeros(batch, slots, 1, dtype=dtype)
    return torch.zeros(batch, heads, slots, width, dtype=kind), torch.zeros(batch, 1, slots, 1, dtype=dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("heads", [None, 3])  # a latent [B, 1, R]; a head-major entry [B, H, 1, D] (dense K / V)
def test_the_fused_write_stores_the_bytes_and_scales_the_reference_stores(bits, dtype, per_row, heads):
    batch, slots, cols = 3, 7, 22
    g = torch.Generator().manual_seed(bits + per_row)
    shape = (batch, 1, cols) if heads is None else (batch, heads, 1, cols)
    value = (torch.randn(*shape, generator=g) * 3).to(dtype)
    token = value if heads is None else value[:, -1]  # the last head: a row's largest |x| may sit in any head
    top = (1 << (bits - 1)) - 1
    if heads is not None:
        value[1] = value[1].clamp(-top, top)
    token[1, 0, :6] = torch.tensor([top, 2.5, -3.5, 0.5, 1.5, -0.5], dtype=dtype)  # scale 1: ties to even
    value[2] = 0  # an all-zero token: scale at the dtype's tiny, levels 0
    slot = torch.tensor([4, 0, 6]) if per_row else torch.tensor([5])
    rows = torch.arange(batch) if per_row else None
    expected, got = (storages(batch, slots, cols, bits, dtype, heads) for _ in range(2))
    quantize_into_static_slot(value, *expected, 1 if heads is None else 2, slot, rows, bits)
    quantize_into_slot(value, *got, slot, bits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].abs().sum() > 0  # something was written
    if heads is not None:
        assert (got[0][:, :, slot[0] if not per_row else 4] != 0).any(dim=-1)[0].all()  # every head of row 0


def test_the_dispatch_sends_latent_and_head_major_writes_to_the_kernel_and_anything_else_to_the_reference(
        monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "quantize_into_slot", lambda *args: calls.append("kernel"))
    write = dispatch.fused_slot_write(lambda *args: calls.append("reference"))
    value, (stored, scales) = torch.randn(2, 1, 8), storages(2, 4, 8, 8, torch.float32)
    monkeypatch.setenv("KVFORGE_KERNELS", "triton")
    write(value, stored, scales, 1, torch.tensor([1]), None, 8)
    dense = torch.randn(2, 3, 1, 8)  # a dense K / V [B, K, 1, D]: slots along dim 2, rounded over K x D
    write(dense, *storages(2, 4, 8, 8, torch.float32, heads=3), 2, torch.tensor([1]), None, 8)
    per_head = torch.zeros(2, 3, 4, 1)  # a scale per head: not a layout the kernel writes
    write(dense, torch.zeros(2, 3, 4, 8, dtype=torch.int8), per_head, 2, torch.tensor([1]), None, 8)
    write(torch.randn(2, 3, 1, 7), *storages(2, 4, 8, 4, torch.float32, heads=3), 2, torch.tensor([1]), None, 4)
    monkeypatch.setenv("KVFORGE_KERNELS", "off")
    write(value, stored, scales, 1, torch.tensor([1]), None, 8)
    assert calls == ["kernel", "kernel", "reference", "reference", "reference"]


LATENT = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10}
PARTIAL = {"kv_proj": "low_rank", "rope": "partial", "kv_rank": 12, "rope_dims": 4}


# Per layer kind: the spec, and its cached tensors (each one write per decode step): latents [B, 1, R]; a dense
# layer's keys and values and a partial-RoPE layer's rotary keys [B, H, 1, D], whose scale spans every head.
@pytest.mark.parametrize("cache_bits, layer", [(8, LATENT), (4, LATENT), (8, {}), (4, {}), (8, PARTIAL)])
def test_static_generate_with_the_fused_write_equals_generate_without_it(cache_bits, layer, monkeypatch):
    layer = dict(layer, cache_bits=cache_bits)
    second = dict(layer, k_rank=8) if "k_rank" in layer else layer
    model = tiny_model([layer, second])
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
    names = sorted({n for _, n in out["off"][1] if not n.endswith("_scale")})
    assert len(names) == 2
    assert len(writes) == 2 * 2 * 4  # two tensors per layer, two layers, four decode steps (the prefill writes its own)
    assert torch.equal(out["off"][0], out["triton"][0])
    assert out["off"][1].keys() == out["triton"][1].keys()
    # Layer 0's entries come from the embeddings alone: the same bytes. Later layers' come after an attention the
    # kernel mode computes in a decode kernel (float noise of ~1e-6), so a level may differ there.
    assert all(torch.equal(out["off"][1][k], out["triton"][1][k]) for k in out["off"][1] if k[0] == 0)
    from kvforge.models.modeling_kvforge import dequantize_slots

    for name in names:
        values = [dequantize_slots(run[1][(1, name)], run[1][(1, name + "_scale")]).float() for run in out.values()]
        scale = out["off"][1][(1, name + "_scale")].float()
        assert ((values[0] - values[1]).abs() <= scale * 1.01 + 1e-6).all()


def test_an_8_bit_static_decode_step_issues_no_more_pytorch_ops_than_a_bf16_one(monkeypatch):
    """Where the kernels serve a static decode step, a low-bit cache's step must not cost more small PyTorch kernels
    than a 16-bit one: each unfused write (quantize_slots and two slot writes) added ~10 per tensor, layer and step.
    The decode kernels are stubbed out (through Triton's interpreter they would issue ops of their own); every aten
    op of a step is counted, over two decode steps, for a dense and a partial-RoPE model."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def outside_the_count(shape, dtype):
        with _disable_current_modes():
            return torch.zeros(shape, dtype=dtype)

    monkeypatch.setattr(dispatch, "gqa_decode_attention",
                        lambda query, *args, **kwargs: outside_the_count(query.shape, query.dtype))

    def partial_rope(rope, nope, k_rope, latent, k_weight, v_weight, *args, **kwargs):
        return outside_the_count(rope.shape[:3] + (v_weight.shape[0] // rope.shape[1],), rope.dtype)

    monkeypatch.setattr(dispatch, "partial_rope_decode_attention", partial_rope)
    monkeypatch.setattr(dispatch, "quantize_into_slot", lambda *args: None)
    monkeypatch.setenv("KVFORGE_KERNELS", "triton")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ops = collections.defaultdict(dict)
    for kind, layer in (("dense", {}), ("partial", PARTIAL)):
        for bits in (None, 8):
            model = tiny_model([dict(layer, cache_bits=bits)] * 2).to(torch.float16)
            steps = []
            for new_tokens in (2, 4):  # the difference: two decode steps
                count = Count()
                with torch.no_grad(), count:
                    model.generate(ids, cache=model.static_cache(13, cuda_graphs=False), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
                steps.append(count.ops)
            ops[kind][bits] = steps[1] - steps[0]
    assert all(ops[kind][8] <= ops[kind][None] for kind in ops), dict(ops)
