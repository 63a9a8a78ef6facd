"""Device kernels per decoder layer in one static-cache decode step (the step a CUDA graph replays).

Profiles one decode step on the CPU (torch.profiler) and counts the aten ops that would launch a device kernel:
leaf ops that are not views or allocations, a Triton launch as one (through its interpreter), torch's
_fused_rms_norm as one (one kernel on CUDA, composite on CPU), minus work only the CPU does (wrapping a Python
scalar into a tensor, the fill_ a CPU reduction starts from). Each bound is the count after the per-layer work
was trimmed (kernels were 1.25-1.4x as many per layer before): a change that adds kernels to every layer fails
here. Per-step work (the slot plan, masks, RoPE tables) is counted outside the layers and not bounded.
"""

import pytest
import torch
from test_modeling_kvforge import build
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NOT_KERNELS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::slice", "aten::select",
    "aten::as_strided", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::permute",
    "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::alias", "aten::detach", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::_unsafe_view", "aten::unbind",
    "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::view_as", "aten::movedim",
    "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::to", "aten::result_type", "aten::expand_as",
    "aten::diagonal", "aten::set_", "aten::dim", "aten::size", "aten::stride",
}
ONE_KERNEL = {"aten::_fused_rms_norm"}
REDUCTIONS = {"aten::mean", "aten::amax", "aten::sum", "aten::max", "aten::min", "aten::any", "aten::all"}


def _cpu_only(event) -> bool:
    if event.name in ("aten::copy_", "aten::_to_copy") and event.input_shapes and event.input_shapes[0] == []:
        return True  # a Python scalar wrapped into a 0-dim tensor
    parent = event.cpu_parent
    return event.name in ("aten::fill_", "aten::zero_") and parent is not None and parent.name in REDUCTIONS


def _kernels(event, out: list) -> bool:
    """Appends the device kernels under `event`; whether there were any."""
    if event.name.startswith("triton::") or event.name in ONE_KERNEL:
        out.append(event.name)
        return True
    if _cpu_only(event):
        return False
    found = False
    for child in event.cpu_children:
        found |= _kernels(child, out)
    if not found and event.name.startswith("aten::") and event.name not in NOT_KERNELS:
        out.append(event.name)
        return True
    return found


def decode_step_kernels(model, monkeypatch) -> dict[int, list[str]]:
    """Prefill into a static cache, one warm decode step, then the kernels of one profiled step per layer."""
    from triton.runtime import interpreter

    launch = interpreter.InterpretedFunction.run

    def named_launch(self, *args, **kwargs):
        with record_function("triton::" + self.fn.__name__):
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", named_launch)
    for idx, layer in enumerate(model.model.layers):
        def forward(*args, _forward=layer.forward, _idx=idx, **kwargs):
            with record_function(f"layer::{_idx}"):
                return _forward(*args, **kwargs)
        monkeypatch.setattr(layer, "forward", forward)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = model.static_cache(24 + 4, cuda_graphs=False)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache)
        for step in range(2):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token = ids[:, -1:] + step + 1
            position = mask.sum(dim=1, keepdim=True) - 1
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache)
    per_layer = {}

    def walk(event):
        if event.name.startswith("layer::"):
            per_layer[int(event.name.removeprefix("layer::"))] = kernels = []
            _kernels(event, kernels)
            return
        for child in event.cpu_children:
            walk(child)

    for event in prof.profiler.function_events:
        if event.cpu_parent is None:
            walk(event)
    return per_layer


PRE_INT8 = {"kv_proj": "low_rank", "rope": "pre_rope_latent", "k_rank": 12, "v_rank": 10, "cache_bits": 8}
WINDOW = {"attention": "window", "window": 8, "sinks": 2}


# layers, KVFORGE_KERNELS, the most kernels any layer may launch (fp32: no dtype casts around the norms)
@pytest.mark.parametrize("layers, kernels, bound", [
    # pre-RoPE latents in int8 through the latent Triton kernel (55 before: float copies and two abs / amax passes in
    # the quantizing of each latent, five ops per RMSNorm; 43 before U_v was one batched GEMM; 42 before each
    # latent's rounding and slot writes were one kernel)
    ([PRE_INT8, PRE_INT8], "triton", 26),
    # window ring, dense K / V, PyTorch (SDPA over K heads, the G query heads as the query length; 43 before: K and V
    # expanded to the query heads, ring writes through scatter_'s temporary copies of the whole ring)
    ([WINDOW, WINDOW], "off", 31),
    # window ring, dense K / V, the GQA Triton kernel (47 before; 37 while its merge of splits was 9 PyTorch ops)
    ([WINDOW, WINDOW], "triton", 30),
], ids=["pre-rope-int8-triton", "window-sdpa", "window-gqa-triton"])
def test_decode_step_kernels_per_layer(layers, kernels, bound, monkeypatch):
    monkeypatch.setenv("KVFORGE_KERNELS", kernels)
    model = build(layers)
    per_layer = decode_step_kernels(model, monkeypatch)
    assert sorted(per_layer) == list(range(len(layers)))
    counts = {idx: len(ops) for idx, ops in per_layer.items()}
    if kernels == "triton":
        assert all(any(op.startswith("triton::") for op in ops) for ops in per_layer.values()), per_layer
    worst = max(counts, key=counts.get)
    assert counts[worst] <= bound, f"layer {worst}: {counts[worst]} kernels > {bound}: {per_layer[worst]}"
    # No op sized by anything but the new token and the cache: no full-storage copies (scatter_ through a temporary,
    # K / V expanded to query heads) in the step.
    assert not any(op == "aten::scatter_" for ops in per_layer.values() for op in ops)
