"""Which implementation serves an attention call: a fused Triton kernel where one applies, else the PyTorch
reference from modeling_kvforge.py (which the kernels' tests hold them equal to).

modeling_kvforge.attention_function(representation) asks `fused_attention(representation, reference)` for
the function to call; the answer has the reference's signature and decides per call, so the modeling code
never changes when a kernel is added; `fused_slot_write` does the same for a static cache's low-bit write. A
kernel serves only what it implements (today: one decode token over a pre-RoPE latent cache,
kernels/latent_attention.py, over a dense / merged-heads / window-ring cache, kernels/gqa_decode.py, or over a
partial-RoPE joint latent with a rotary key per KV head or one shared by all, kernels/partial_rope_decode.py; no
gradients, no dropout, no attention probabilities asked for); anything else goes to the reference.

KVFORGE_KERNELS (read per call):
    auto   (default) Triton on CUDA tensors in bf16 / fp16, PyTorch elsewhere
    off    PyTorch everywhere (debugging, A/B benchmarks)
    triton Triton wherever it applies, CPU tensors included -- which needs TRITON_INTERPRET=1 set before
           triton was first imported (the kernels' CPU tests run this way)

This file is copied flat beside modeling_kvforge.py in an exported directory; it imports only torch and its
sibling kernel files.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

from .gqa_decode import fits_head_dim, gqa_decode_attention
from .latent_attention import (MAX_PACKED_HALF_RANK, OutOfResources, available, latent_decode_attention,
                               quantize_into_slot)
from .partial_rope_decode import fits as fits_partial_rope
from .partial_rope_decode import partial_rope_decode_attention

MODES = ("auto", "off", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("KVFORGE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"KVFORGE_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def use_triton(tensor: torch.Tensor, float32_exact: bool = False) -> bool:
    """Whether KVFORGE_KERNELS sends work on `tensor` to a Triton kernel (`float32_exact`: the kernel does no
    tl.dot, so float32 inputs keep their precision)."""
    mode = kernel_mode()
    if mode == "off" or not available():
        return False
    if tensor.is_cuda:
        # float32 tl.dot runs in tf32 on the GPU: a float32 model would lose the precision PyTorch gives it
        # (measured on an H100: 1e-2 relative logits difference after one decode step, vs 2e-5 float64-float32).
        return float32_exact or tensor.dtype in (torch.bfloat16, torch.float16)
    if mode == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("KVFORGE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                               "before triton is imported")
        return True
    return False


# Kernels whose launch at some shape found no resources on this GPU (shared memory, registers): the reference serves
# those shapes from then on, instead of a decode that crashes (kernel, shape).
_TOO_BIG: set[tuple] = set()


# Never traced by torch.compile (a compiled static decode step, KVForgeCache(compile_step=True)): there the step's
# PyTorch ops are compiled around each kernel launch, which runs as it does uncompiled (a graph break), so a compiled
# step launches the kernels these files test, whatever Dynamo's support for user Triton kernels in the installed
# torch. Reached only where a kernel applies, so a compiled training forward (never one) has no break from it.
@torch.compiler.disable
def _kernel_or_reference(name: str, shape: tuple, kernel: Callable, reference: Callable):
    """kernel(), or reference() where Triton found the kernel too big for this GPU at this shape (warned once)."""
    if (name, shape) in _TOO_BIG:
        return reference()
    try:
        return kernel()
    except OutOfResources as error:
        _TOO_BIG.add((name, shape))
        warnings.warn(f"the {name} decode kernel does not fit this GPU at shape {shape} ({error}); the PyTorch "
                      f"reference serves it")
        return reference()


def _cache_dtypes_fit(query, key, value, k_scale, v_scale, packed: bool = False) -> bool:
    """The cached tensors are in the query's dtype, or a low-bit cache's integers with scales in the query's dtype:
    int8 (8 bits), or with `packed` (a kernel that unpacks them) uint8 holding two 4-bit values per byte."""
    if k_scale is None:
        return key.dtype == value.dtype == query.dtype
    formats = (torch.int8, torch.uint8) if packed else (torch.int8,)
    return key.dtype == value.dtype and key.dtype in formats and k_scale.dtype == v_scale.dtype == query.dtype


def _is_power_of_2(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def _plain_linear(*modules) -> bool:
    # The kernel reads .weight / .bias; a wrapped projection (LoRA before merging) computes more than that.
    return all(type(m) is torch.nn.Linear for m in modules)


def _pre_rope_latent(reference: Callable) -> Callable:
    @functools.wraps(reference)
    def attend(query, k_latent, v_latent, k_up, v_up, key_rotary, mask, scaling, *, need_probs=False, dropout=0.0,
               use_sdpa=False, absorb=None, k_scale=None, v_scale=None):
        fits = (
            query.shape[3] == 1 and not need_probs and not dropout and absorb is not False
            and _plain_linear(k_up, v_up) and _is_power_of_2(query.shape[-1])  # Triton's aranges need 2^n
            and k_up.weight.dtype == query.dtype
            and _cache_dtypes_fit(query, k_latent, v_latent, k_scale, v_scale, packed=True)
            and not (k_latent.dtype == torch.uint8 and k_latent.shape[-1] > MAX_PACKED_HALF_RANK)
            and not (torch.is_grad_enabled() and (query.requires_grad or k_up.weight.requires_grad))
        )

        def pytorch():
            return reference(query, k_latent, v_latent, k_up, v_up, key_rotary, mask, scaling, need_probs=need_probs,
                             dropout=dropout, use_sdpa=use_sdpa, absorb=absorb, k_scale=k_scale, v_scale=v_scale)

        def kernel():
            out = latent_decode_attention(
                query[:, :, :, 0], k_latent, v_latent, k_up.weight, k_up.bias, v_up.weight, v_up.bias,
                key_rotary.positions, mask[:, 0, 0, 0, :], key_rotary.inv_freq, key_rotary.scaling, scaling,
                max_position=key_rotary.max_position(), k_scale=k_scale, v_scale=v_scale)
            return out[:, :, :, None], None

        if not (use_triton(query) and fits):  # the mode first: a bad KVFORGE_KERNELS fails on every call
            return pytorch()
        shape = (query.dtype, k_latent.dtype, tuple(query.shape[1:]), k_latent.shape[-1], v_latent.shape[-1])
        return _kernel_or_reference("pre-RoPE latent", shape, kernel, pytorch)

    return attend


# The last decode mask given to the GQA kernel and its rows as bytes: every layer of a slot layout gets the same mask
# tensor in a step (SlotPlan.mask), so the bool -> uint8 copy runs once per step and layout, not once per layer.
# Held by identity: a new step's mask is a new tensor (the old one, referenced here, cannot be mistaken for it).
_LAST_VALID: list = [None, None]


def _valid_bytes(mask: torch.Tensor) -> torch.Tensor:
    """mask [B or 1, 1, 1, 1, S] bool -> [B or 1, S] uint8, contiguous (what gqa_decode_attention reads)."""
    if _LAST_VALID[0] is not mask:
        _LAST_VALID[:] = [mask, mask[:, 0, 0, 0, :].to(torch.uint8).contiguous()]
    return _LAST_VALID[1]


def _kv(reference: Callable) -> Callable:
    @functools.wraps(reference)
    def attend(query, key, value, mask, scaling, *, need_probs=False, dropout=0.0, use_sdpa=False, causal=False,
               k_scale=None, v_scale=None):
        packed = key.dtype == torch.uint8  # a 4-bit cache: two values a byte
        fits = (
            query.shape[3] == 1 and not need_probs and not dropout and not causal
            and fits_head_dim(query.shape[-1], packed)
            and value.shape[-1] == key.shape[-1] == query.shape[-1] // (2 if packed else 1)
            and _cache_dtypes_fit(query, key, value, k_scale, v_scale, packed=True)
            and key.stride(-1) == 1 and value.stride(-1) == 1
            and not (torch.is_grad_enabled() and query.requires_grad)
        )

        def pytorch():
            return reference(query, key, value, mask, scaling, need_probs=need_probs, dropout=dropout,
                             use_sdpa=use_sdpa, causal=causal, k_scale=k_scale, v_scale=v_scale)

        def kernel():
            out = gqa_decode_attention(query[:, :, :, 0].contiguous(), key, value, None, scaling,
                                       valid=_valid_bytes(mask), k_scale=k_scale, v_scale=v_scale)
            return out[:, :, :, None], None

        # Measured (H200, session 25): 1.8-2.4x kvforge's PyTorch path per layer over a bf16 cache (whose SDPA call
        # takes the decode mask), 14-17x over an 8-bit one and 18-20x over a 4-bit one, which PyTorch dequantizes
        # whole; a compiled generate() step of the original layout 5.6 ms against 13.2 (B=128 x 4k).
        if not (use_triton(query) and fits):
            return pytorch()
        return _kernel_or_reference("GQA", (query.dtype, key.dtype, tuple(query.shape[1:])), kernel, pytorch)

    return attend


def _partial(reference: Callable) -> Callable:
    @functools.wraps(reference)
    def attend(query_rope, query_nope, k_rope, kv_latent, k_up, v_up, mask, scaling, *, need_probs=False,
               dropout=0.0, absorb=None, k_rope_scale=None, kv_latent_scale=None):
        batch, kv_heads, group, length, rope_dim = query_rope.shape
        fits = (
            length == 1 and not need_probs and not dropout and absorb is not False and _plain_linear(k_up, v_up)
            and fits_partial_rope(kv_heads * group, kv_heads, k_rope.shape[1], kv_latent.shape[-1], rope_dim)
            and k_up.weight.dtype == v_up.weight.dtype == query_rope.dtype == query_nope.dtype
            and _cache_dtypes_fit(query_rope, k_rope, kv_latent, k_rope_scale, kv_latent_scale)
            and not (torch.is_grad_enabled() and (query_rope.requires_grad or query_nope.requires_grad
                                                  or k_up.weight.requires_grad or v_up.weight.requires_grad))
        )

        def pytorch():
            return reference(query_rope, query_nope, k_rope, kv_latent, k_up, v_up, mask, scaling,
                             need_probs=need_probs, dropout=dropout, absorb=absorb, k_rope_scale=k_rope_scale,
                             kv_latent_scale=kv_latent_scale)

        def kernel():
            out = partial_rope_decode_attention(query_rope[:, :, :, 0], query_nope[:, :, :, 0], k_rope, kv_latent,
                                                k_up.weight, v_up.weight, v_up.bias, scaling,
                                                valid=mask[:, 0, 0, 0, :], k_rope_scale=k_rope_scale,
                                                kv_latent_scale=kv_latent_scale)
            return out[:, :, :, None], None

        # Measured (H200, sessions 18-24): 9-15x the reference's speed at every shape from 64 x 4k to 128 x 16k,
        # bf16 and 8-bit caches.
        if not (use_triton(query_rope) and fits):
            return pytorch()
        shape = (query_rope.dtype, kv_latent.dtype, tuple(query_rope.shape[1:]), tuple(k_rope.shape[1:2]),
                 kv_latent.shape[-1])
        return _kernel_or_reference("partial-RoPE", shape, kernel, pytorch)

    return attend


# "partial_shared" (one rotary key for every head, DeepSeek MLA) is the same reference function under its own name:
# the partial-RoPE kernel takes k_rope with 1 or K heads, so it serves both.
_FUSED: dict[str, Callable[[Callable], Callable]] = {"pre_rope_latent": _pre_rope_latent, "kv": _kv,
                                                     "partial": _partial, "partial_shared": _partial}


@functools.lru_cache(maxsize=None)
def fused_attention(representation: str, reference: Callable) -> Callable:
    """The function modeling_kvforge should call for `representation`: a kernel-or-reference wrapper, or the
    reference itself when no kernel exists for it."""
    wrap = _FUSED.get(representation)
    return reference if wrap is None else wrap(reference)


@torch.compiler.disable  # as _kernel_or_reference: launched as uncompiled inside a compiled decode step
def _launch_slot_write(value, stored, scales, slot, bits):
    return quantize_into_slot(value, stored, scales, slot, bits)


def fused_slot_write(reference: Callable) -> Callable:
    """modeling_kvforge.quantize_into_static_slot (one new token per row rounded to 8 or 4 bits and written into its
    static-cache slot: ~10 small kernels per cached tensor) as one Triton launch where it applies: a latent
    [B, 1, R] written along dim 1, or a head-major entry [B, H, 1, D] (dense keys and values, rotary keys: one scale
    per slot over all heads) along dim 2. The same bytes either way; no tl.dot, so float32 stays exact."""
    @functools.wraps(reference)
    def write(value, stored, scales, slot_dim, slot, rows, bits):
        latent = value.dim() == 3 and slot_dim == 1 and stored.dim() == 3
        head_major = value.dim() == 4 and slot_dim == 2 and stored.dim() == 4 and scales.shape[1] == 1
        fits = ((latent or head_major) and value.shape[slot_dim] == 1 and bits in (4, 8)
                and stored.stride(-1) == 1 and scales.dtype == value.dtype
                and not (bits == 4 and value.shape[-1] % 2))
        if use_triton(value, float32_exact=True) and fits:
            return _launch_slot_write(value, stored, scales, slot, bits)
        return reference(value, stored, scales, slot_dim, slot, rows, bits)

    return write


__all__ = ["fused_attention", "fused_slot_write", "kernel_mode", "use_triton", "MODES"]
