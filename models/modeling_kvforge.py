"""KVForge: a Llama-family causal LM whose attention layers and KV cache follow a per-layer compression spec.

This file ships beside exported weights and loads with plain `transformers` (trust_remote_code): it imports
only torch, transformers, its config and (optionally) the kernel dispatch, behind `attention_function`.

Shape legend (suffixes in comments):
    B batch, T new tokens (queries) in this forward, S attendable key slots (cached + new), E hidden size,
    H query heads, K kv heads of the cache being read, G = H // K query heads per kv head, D head_dim,
    Dr / Dn rotary / non-rotary dims per kv head (partial RoPE; with a shared rotary key, Dr per query head and
    once in the cache, Dn = D), R latent rank.

How a forward step flows:
    KVForgeModel computes, once per *slot layout* (global, or one (window, sinks) ring), a `SlotPlan`: which
    token every attendable key slot holds, the boolean mask, and where the new tokens are written. Each
    attention layer projects what its spec caches, writes it into its `LayerStorage` (if a cache is in use)
    and attends over the slots; one `CacheRepresentation` class per kind of cache (dense K/V, pre-RoPE latents,
    partial-RoPE latent, shared rotary key, values only) holds its modules, cache entries and attention, whose
    decode form goes through `attention_function`, the seam where Triton kernels plug in. Cross-layer sharing
    (kv_from, probs_from) goes through a per-forward `LayerHandoff`, the same with or without a cache, so
    training and generation run the same code.

Token index vs position: masks use each token's index among its row's *real* tokens (padding excluded), so
windows and sinks count real tokens whatever the padding; RoPE uses position_ids exactly as given (as Llama).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import utils as generation_utils
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.utils import logging

from .configuration_kvforge import KVForgeConfig, LayerSpec
from .pyramid import PyramidKV, PyramidSettings

# Fused kernels (kernels/dispatch.py). In an exported directory the kernel files sit beside this one and export
# rewrites this line to the relative import transformers bundles; without them (a plain save_pretrained copy,
# kvforge absent) every attention call takes the PyTorch references below.
try:
    from kvforge.kernels.dispatch import fused_attention, fused_slot_write
    # Early transformers 5.x (seen with 5.0.0; 5.10 copies them all) copies only the files that a local
    # directory's modeling file imports itself, not what those import: every kernel file that dispatch needs is
    # named here, or such an export does not load there.
    from kvforge.kernels.latent_attention import available as _latent_kernel_available  # noqa: F401
    from kvforge.kernels.gqa_decode import available as _gqa_kernel_available  # noqa: F401
    from kvforge.kernels.partial_rope_decode import available as _partial_rope_kernel_available  # noqa: F401
except ImportError:
    fused_attention = fused_slot_write = None

try:  # transformers' init helpers skip tensors already loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older transformers 5.x
    hf_init = None

logger = logging.get_logger(__name__)

# The name under which generate() hands the cache to forward() and reads it back from the outputs: `cache` from
# transformers 5.24 on (`past_key_values` deprecated there, removal announced for 5.40), `past_key_values` before.
# Reading a cache passed under the other name silently builds a second cache every step: cached decoding then
# diverges from uncached decoding. forward() accepts both; generate() gets the cache under this one.
CACHE_ARGUMENT = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"

# How far a compiled static decode step's hidden states may sit from the uncompiled step's, relative to their norm,
# on its first call (KVForgeModel._decode_step). In float32 the two differ by float noise, or by one rounding level
# of a low-bit cache where a value falls on a boundary (~1e-4 relative); in bf16 / fp16 by fused kernels rounding once
# where eager ops round at each op. A wrong slot, a stale cache or a dropped term moves them by O(1).
COMPILED_STEP_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _one_cache(cache, past_key_values):
    """The cache passed under either name (see CACHE_ARGUMENT); two different caches are a caller's bug."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not two different caches")
    return cache if cache is not None else past_key_values


# ================================================================================================
# Llama building blocks
# ================================================================================================


class KVForgeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Llama's x * rsqrt(mean(x^2) + eps) in float32, rounded to the input dtype before the weight; through
        # F.rms_norm, one fused kernel on CUDA instead of five elementwise ops and a reduction per norm.
        input_dtype = hidden_states.dtype
        normed = F.rms_norm(hidden_states.to(torch.float32), hidden_states.shape[-1:], eps=self.variance_epsilon)
        return self.weight * normed.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class KVForgeRotaryEmbedding(nn.Module):
    """Llama's rotary embedding (rope_parameters incl. scaled types); cos/sin for any [B, L] positions."""

    def __init__(self, config: KVForgeConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: KVForgeConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        inv_freq = 1.0 / (base ** exponents)
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x only gives dtype/device; position_ids [B, L] -> cos, sin [B, L, D] in x.dtype."""
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        positions = position_ids[:, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # rotary angles in fp32 always
            freqs = (inv_freq @ positions).transpose(1, 2)  # [B, L, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., L, D'] by cos/sin broadcastable to it (frequency pair i = dims (i, i + D'/2))."""
    return x * cos + rotate_half(x) * sin


class KVForgeMLP(nn.Module):
    def __init__(self, config: KVForgeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ================================================================================================
# Slot layouts: which token each cache slot holds, and the mask
# ================================================================================================


def visibility_mask(query_index: torch.Tensor, key_index: torch.Tensor, window: int | None, sinks: int,
                    padding: bool = True) -> torch.Tensor:
    """Which keys each query may attend to.

    query_index [B, T], key_index [B, S]: index of the token among its row's real tokens, -1 for padding or
    an empty slot. The new tokens are always the last T key slots. Returns bool [B, 1, 1, T, S].

    A real query sees real keys that are not later than itself and, for a window layer, lie within the last
    `window` tokens (itself included) or among the first `sinks` tokens. A padded query sees only itself, so
    no softmax row is empty (its output is never used). padding=False promises no index is -1 (skips both).
    """
    q = query_index[:, :, None]  # [B, T, 1]
    k = key_index[:, None, :]  # [B, 1, S]
    # Every comparison takes [B, T, 1] against [B, 1, S] and gives bool [B, T, S] directly: no int64 [B, T, S]
    # (q - k was one, 256 GiB for a 32k-token prompt at batch 32).
    visible = k <= q
    if padding:
        visible &= k >= 0
    if window is not None:
        near = k > q - window
        near |= k < sinks
        visible &= near
    if padding:
        num_new = query_index.shape[1]
        visible[:, :, -num_new:] |= torch.diag_embed(query_index < 0)  # [B, T, T]
    return visible[:, None, None]


@dataclass
class KeyRotary:
    """RoPE for keys rotated at attention time (pre-RoPE latent caches), at the keys' positions [B, S].

    inv_freq [D/2] (float32) and scaling are the model's rotary embedding's, so `tables()` equals what
    KVForgeRotaryEmbedding returns for these positions. A fused kernel reads `positions` and computes the angles
    itself instead of reading two [B, S, D] tables.
    """

    positions: torch.Tensor  # [B, S] long
    inv_freq: torch.Tensor  # [D/2] float32
    scaling: float
    dtype: torch.dtype
    _tables: tuple | None = field(default=None, repr=False)
    _max_position: int | None = field(default=None, repr=False)

    def max_position(self) -> int:
        """The largest position (read from the device once per step: every layer of the layout shares it)."""
        if self._max_position is None:
            self._max_position = int(self.positions.max())
        return self._max_position

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D] in `dtype` (built once)."""
        if self._tables is None:
            with torch.autocast(device_type=self.positions.device.type, enabled=False):  # angles in fp32 always
                freqs = self.positions[..., None].float() * self.inv_freq.float().to(self.positions.device)
                emb = torch.cat((freqs, freqs), dim=-1)
                self._tables = ((emb.cos() * self.scaling).to(self.dtype), (emb.sin() * self.scaling).to(self.dtype))
        return self._tables


@dataclass
class SlotPlan:
    """One forward step of one slot layout: what the attendable key slots hold and where new tokens go.

    Attendable slots = the layout's cached slots followed by the T new tokens (so a window layer attends over
    at most window + sinks + T slots, a global layer over all tokens so far).
    """

    window: int | None
    sinks: int
    query_index: torch.Tensor  # [B, T]
    key_index: torch.Tensor  # [B, S]
    key_positions: torch.Tensor  # [B, S] RoPE positions of the attendable slots
    built_mask: torch.Tensor | None  # [B, 1, 1, T, S] bool; None with no_padding: see `mask`
    cached_slots: int = 0  # the first `cached_slots` attendable slots come from the cache
    # global layout: the new tokens go to slots [start, start + T) of storage with `capacity` slots
    start: int = 0
    capacity: int = 0
    # ring layout: new token (write_batch[n], write_token[n]) goes to slot write_slot[n]
    write_batch: torch.Tensor | None = None
    write_token: torch.Tensor | None = None
    write_slot: torch.Tensor | None = None
    rotary: Callable | None = None  # positions [B, S] -> KeyRotary
    # static decode (KVForgeCache(static=True), one new token): the slot each row's token goes to, [B] or [1] long;
    # attendable slots are the layout's whole storage, its mask from token_index (nothing read back to the host)
    static_slot: torch.Tensor | None = None
    static_rows: torch.Tensor | None = None  # arange(B) beside a [B] static_slot (the ring's per-row writes)
    max_position: int | None = None  # a bound on key_positions known without reading the device
    # Every row's T new tokens are real and every row sees the same keys (a training step, a prefill without
    # padding, a later chunk of one on a global layout): every row has the same mask, so one row of it serves the
    # batch.
    no_padding: bool = False
    _key_rotary: KeyRotary | None = field(default=None, repr=False)
    _sdpa_mask: tuple | None = field(default=None, repr=False)  # (mask, causal), see sdpa_mask

    @property
    def is_ring(self) -> bool:
        return self.window is not None

    @property
    def mask(self) -> torch.Tensor:
        """[B, 1, 1, T, S] bool; with no_padding one row [1, 1, 1, T, S], built on first use (SDPA with is_causal
        never needs it: at 32k tokens it would be 1 GiB). Its keys may still hold empty slots (-1: a cleared static
        ring's), the same in every row."""
        if self.built_mask is None:
            self.built_mask = visibility_mask(self.query_index[:1], self.key_index[:1], self.window, self.sinks,
                                              padding=self.cached_slots > 0)
        return self.built_mask

    def sdpa_mask(self) -> tuple[torch.Tensor | None, bool]:
        """The mask SDPA needs for this layout and step, decided once for all its layers: (mask [B or 1, 1, 1, T,
        S], causal); None with causal.

        Without padding (no_padding) one mask row serves the batch; and if nothing is cached and no window cuts
        into the T tokens it is the plain causal mask, for which SDPA takes is_causal instead (the flash kernel: no
        [T, S] mask at all).
        Kept on the plan, which lives one forward, rather than in a table keyed by id(plan): under torch.compile
        of single layers an id() becomes a guard on the object, which fails on every new forward's plan.
        """
        if self._sdpa_mask is None:
            # is_causal aligns the mask's corner top left: right only with nothing cached (T == S).
            if (self.no_padding and self.cached_slots == 0
                    and (self.window is None or self.window >= self.query_index.shape[1])):
                self._sdpa_mask = (None, True)
            else:
                self._sdpa_mask = (self.mask, False)
        return self._sdpa_mask

    def key_rotary(self) -> KeyRotary:
        """RoPE at the attendable keys' positions (for keys rotated at attention time); one per step, so the
        PyTorch path builds its cos/sin tables once for every layer of this layout."""
        if self._key_rotary is None:
            self._key_rotary = self.rotary(self.key_positions)
            if self.max_position is not None:
                self._key_rotary._max_position = self.max_position
        return self._key_rotary


class SlotLayout:
    """Slot bookkeeping shared by every layer that caches the same way.

    Global layout: slot = the token's column in the sequence (left padding included); storage grows in
    chunks (or is sized once from generate()'s max length). Ring layout (window W, sinks): W + sinks slots;
    real token n goes to slot n if n < sinks else sinks + (n - sinks) % W, so each row keeps its own sinks
    and last W tokens whatever its padding. token_index / positions record what each slot holds.
    """

    GROWTH_CHUNK = 256

    def __init__(self, window: int | None, sinks: int, max_cache_len: int | None = None, static: bool = False):
        self.window, self.sinks = window, sinks
        self.max_cache_len = max_cache_len
        self.static = static
        self.reset()

    def reset(self) -> None:
        self.token_index: torch.Tensor | None = None  # [B, C] long, -1 = empty slot or padding
        self.positions: torch.Tensor | None = None  # [B, C] long
        self.length = 0  # global: slots written so far (== cache sequence length)
        self.length_on_device: torch.Tensor | None = None  # static global layout: `length` as a [1] tensor
        self.written = False  # a forward has committed tokens (a static layout cleared in place holds none)
        # Whether slot i holds the same token in every row whenever the attention mask has no padding: true for the
        # global layout (slot = column), false once slots are chosen per row (PyramidKV's compacted layouts).
        self.rows_alike = True

    @property
    def is_ring(self) -> bool:
        return self.window is not None

    @property
    def capacity(self) -> int:
        return 0 if self.token_index is None else self.token_index.shape[1]

    def clear(self) -> None:
        """A static layout emptied in place: its tensors keep their addresses (a captured decode graph reads them)
        and hold what a fresh layout's would, every slot empty."""
        if self.token_index is not None:
            self.token_index.fill_(-1)
            self.positions.zero_()
        if self.length_on_device is not None:
            self.length_on_device.zero_()
        self.length = 0
        self.written = False
        self.rows_alike = True

    def plan(self, query_index: torch.Tensor, query_positions: torch.Tensor, writes: bool = True,
             no_padding: bool = False) -> SlotPlan:
        """The step that writes T new tokens (does not change the layout; `commit` does). `writes=False` on an
        empty layout: a forward without a cache, which only attends (no ring slots: computing them needs the
        device's answer, a sync that would also split a compiled graph). no_padding: no token of this forward is
        padding; on an empty layout with T > 1 every row's mask is then the same (SlotPlan.no_padding)."""
        batch, num_new = query_index.shape
        if self.token_index is not None and self.token_index.shape[0] != batch:
            raise ValueError(
                f"the cache holds batch size {self.token_index.shape[0]} but this forward has batch size {batch}; "
                f"start a new KVForgeCache for a new batch"
            )
        if self.static and num_new == 1 and self.written:
            return self._static_decode_plan(query_index, query_positions)
        # One new token stays per row: a decode kernel reads one mask row per batch row. Several new tokens with no
        # padding anywhere (the attention mask covers the cached columns too) see the same keys in every row, so
        # one mask row serves the batch: on an empty layout, and on a global one whose rows are alike (a chunked
        # prefill's later chunks, whose per-row mask was [B, 1, 1, T, S]: 128 MiB per row for 4,096 new tokens
        # over 32k), and on a cleared static ring (a kept cache's next generate(): every slot empty in every row,
        # where a per-row mask was [B, 1, 1, T, W + T], 68 GiB at 128 x 16k as SDPA's bf16 bias).
        shared = no_padding and num_new > 1 and (
            not self.written or (not self.is_ring and self.rows_alike))
        if not self.is_ring:
            start = self.length
            needed = start + num_new
            capacity = self.capacity
            if needed > capacity:
                if capacity == 0 and self.max_cache_len is not None:
                    capacity = max(needed, self.max_cache_len)
                else:
                    capacity = math.ceil(needed / self.GROWTH_CHUNK) * self.GROWTH_CHUNK
            old_index = self.token_index[:, :start] if self.token_index is not None else query_index[:, :0]
            old_positions = self.positions[:, :start] if self.positions is not None else query_positions[:, :0]
            key_index = torch.cat([old_index, query_index], dim=1)
            key_positions = torch.cat([old_positions, query_positions], dim=1)
            mask = None if shared else visibility_mask(query_index, key_index, None, 0)
            return SlotPlan(None, 0, query_index, key_index, key_positions, mask, cached_slots=start, start=start,
                            capacity=capacity, no_padding=shared)

        window, sinks = self.window, self.sinks
        full = window + sinks
        capacity = self.capacity or (min(full, self.max_cache_len) if self.max_cache_len else full)
        if not writes and self.token_index is None:
            mask = None if shared else visibility_mask(query_index, query_index, window, sinks)
            return SlotPlan(window, sinks, query_index, query_index, query_positions, mask,
                            cached_slots=self.capacity, capacity=capacity, no_padding=shared)
        valid = query_index >= 0
        row_last = query_index.max(dim=1, keepdim=True).values  # [B, 1]
        # Later queries see at most the sinks and the last W - 1 tokens before them. The ring keeps the last W
        # (W + sinks slots, as the spec counts) so that a decode kernel can write the new token first and then
        # attend over the ring alone; this reference attends over ring + new tokens instead (same keys).
        keep = valid & ((query_index < sinks) | (query_index > row_last - window))
        slot = torch.where(query_index < sinks, query_index, sinks + (query_index - sinks).remainder(window))
        write_batch, write_token = keep.nonzero(as_tuple=True)
        write_slot = slot[write_batch, write_token]
        if write_slot.numel() and int(write_slot.max()) >= capacity:
            capacity = full  # the max_cache_len hint was exceeded
        if self.token_index is not None:
            key_index = torch.cat([self.token_index, query_index], dim=1)
            key_positions = torch.cat([self.positions, query_positions], dim=1)
        else:
            key_index, key_positions = query_index, query_positions
        mask = None if shared else visibility_mask(query_index, key_index, window, sinks)
        return SlotPlan(window, sinks, query_index, key_index, key_positions, mask, cached_slots=self.capacity,
                        capacity=capacity, write_batch=write_batch, write_token=write_token, write_slot=write_slot,
                        no_padding=shared)

    def _static_decode_plan(self, query_index: torch.Tensor, query_positions: torch.Tensor) -> SlotPlan:
        """One new token per row into preallocated storage, with no host sync and no shape that changes per step
        (what a CUDA graph or torch.compile needs): the token's slot comes from device tensors (global: the
        `length_on_device` column; ring: each row's own slot), token_index / positions are written now (so the
        mask sees the new token), and attention reads the whole storage under the mask. Writing twice is
        harmless (a graph's warm-up runs the step once more); KVForgeCache.static_decode advances the counters."""
        if self.is_ring:
            q = query_index[:, 0].clamp_min(0)
            static_slot = torch.where(q < self.sinks, q, self.sinks + (q - self.sinks).remainder(self.window))  # [B]
            rows = torch.arange(q.shape[0], device=q.device)  # once per step and layout, for every layer's writes
        else:
            static_slot, rows = self.length_on_device, None  # [1]
        _write_static_slot(self.token_index, 1, static_slot, query_index, rows)
        _write_static_slot(self.positions, 1, static_slot, query_positions, rows)
        mask = visibility_mask(query_index, self.token_index, self.window, self.sinks)
        return SlotPlan(self.window, self.sinks, query_index, self.token_index, self.positions, mask,
                        cached_slots=self.capacity, capacity=self.capacity, static_slot=static_slot,
                        static_rows=rows, max_position=self.max_cache_len)

    def commit(self, plan: SlotPlan, query_positions: torch.Tensor) -> None:
        """After a forward (static decode steps write in their plan; KVForgeCache.static_decode advances them)."""
        self.token_index = _grow_slots(self.token_index, plan.capacity, 1, plan.query_index, fill=-1)
        self.positions = _grow_slots(self.positions, plan.capacity, 1, query_positions, fill=0)
        _write_slots(self.token_index, 1, plan, plan.query_index)
        _write_slots(self.positions, 1, plan, query_positions)
        self.written = True
        if not self.is_ring:
            self.length = plan.start + plan.query_index.shape[1]
            if self.static and self.length_on_device is None:
                self.length_on_device = torch.tensor([self.length], device=self.token_index.device)
            elif self.static:  # in place, as every static tensor (SlotLayout.clear)
                self.length_on_device.fill_(self.length)

    def select_batch(self, indices: torch.Tensor) -> None:
        if self.token_index is not None:
            self.token_index = self.token_index[indices]
            self.positions = self.positions[indices]

    def crop(self, length: int) -> None:
        """Global layout only (KVForgeCache.crop checks)."""
        self.length = min(self.length, length)
        if self.token_index is not None:
            self.token_index[:, self.length:] = -1
        if self.length_on_device is not None:  # a static layout's next decode step writes there
            self.length_on_device.fill_(self.length)


def _grow_slots(tensor: torch.Tensor | None, capacity: int, slot_dim: int, like: torch.Tensor,
                fill: float = 0) -> torch.Tensor:
    """`tensor` with at least `capacity` slots along slot_dim (old content kept); allocated like `like`
    (batch, trailing dims, dtype, device) on first use. Fresh slots hold `fill` (never NaN garbage: a masked
    slot still enters probs @ V as 0 * value)."""
    if tensor is not None and tensor.shape[slot_dim] >= capacity:
        return tensor
    shape = list(like.shape)
    shape[slot_dim] = capacity
    grown = torch.full(shape, fill, dtype=like.dtype, device=like.device)
    if tensor is not None:
        grown.narrow(slot_dim, 0, tensor.shape[slot_dim]).copy_(tensor)
    return grown


def _write_static_slot(storage: torch.Tensor, slot_dim: int, slot: torch.Tensor, new: torch.Tensor,
                       rows: torch.Tensor | None) -> None:
    """One new token per row (new has 1 along slot_dim) into slot[b] of row b ([B]; rows: arange(B), the plan's
    static_rows, made once per step), or into slot[0] of every row ([1]; rows None), with device indices only: one
    kernel that touches only the written entries. (scatter_ with an index expanded over the other dims copied the
    whole storage to a temporary and back, twice per write on CPU in bf16: a ring's full size per layer and step.)"""
    if slot.shape[0] == 1:
        storage.index_copy_(slot_dim, slot, new)
        return
    (_write_rows_uncompiled if storage.is_cuda else _write_rows)(storage, slot_dim, slot, new, rows)


def _write_rows(storage: torch.Tensor, slot_dim: int, slot: torch.Tensor, new: torch.Tensor,
                rows: torch.Tensor) -> None:
    storage.movedim(slot_dim, 1).index_put_((rows, slot), new.movedim(slot_dim, 1).select(1, 0))


# On a GPU the per-row write runs as it runs uncompiled: in place, one kernel (a graph break, as the decode kernels'
# launches are). In a compiled GPU step Inductor wrote it out of place, a copy of the whole ring and back around
# each, as this index_put_ and as an index_copy_ into the storage viewed flat (both kept in place on the CPU, whose
# compiled step stays one graph): 25 + 24 us per tensor, layer and step at 128 rows x 1,024 slots, half of a window
# layout's step (H200, session 25: 5.96 ms a step; 3.33 with the index_copy_ run uncompiled, whose index arithmetic
# took five more small kernels per tensor than this).
_write_rows_uncompiled = torch.compiler.disable(_write_rows)


def _write_slots(storage: torch.Tensor, slot_dim: int, plan: SlotPlan, new: torch.Tensor) -> None:
    """Writes the new tokens' entries (new has T along slot_dim) into their slots."""
    if not plan.is_ring:
        storage.narrow(slot_dim, plan.start, new.shape[slot_dim]).copy_(new)
        return
    # Advanced indexing on a view writes through to the storage.
    storage.movedim(slot_dim, 1)[plan.write_batch, plan.write_slot] = new.movedim(slot_dim, 1)[
        plan.write_batch, plan.write_token]


# ================================================================================================
# The cache
# ================================================================================================


# A low-bit cache (LayerSpec.cache_bits) stores each tensor's integer values under its name and their scales under
# name + SCALE_SUFFIX, with the same slot axis: ring writes, static decode, select_batch, crop and PyramidKV's
# gathers move them like any cached tensor. The values' dtype says the format: int8 for 8 bits; uint8 holding two
# 4-bit values per byte along the last dim (never the slot axis) for 4 bits.
SCALE_SUFFIX = "_scale"


def cached_slot_dims(layer: LayerSpec) -> dict[str, int]:
    """name -> slot (token) axis of each tensor a layer stores (configuration_kvforge.CACHED_TENSORS; a low-bit
    cache adds each tensor's scales)."""
    dims = {name: tensor.slot_dim for name, tensor in layer.cached_tensors.items()}
    if layer.cache_bits is not None:
        dims.update({name + SCALE_SUFFIX: dim for name, dim in list(dims.items())})
    return dims


def _rounded_levels(x: torch.Tensor, slot_dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (integer levels as float32, scales in x's dtype): one absmax scale per row and slot over every other
    axis (a latent's dims, or every head's dims), symmetric, rounded to nearest, in [-(2^(bits-1) - 1),
    2^(bits-1) - 1]."""
    reduce = [d for d in range(1, x.dim()) if d != slot_dim]
    x = x.detach()
    # max |x| in one reduction (no float32 copy of x: the largest magnitude is one of x's values, exact in its dtype).
    amax = torch.linalg.vector_norm(x, float("inf"), dim=reduce, keepdim=True)
    top = (1 << (bits - 1)) - 1
    # The scale is rounded to x's dtype before dividing by it, so stored and recomputed values agree exactly;
    # the clamp keeps an all-zero slot at 0 (not 0/0). Ops on a 16-bit dtype compute in float32 and round once, so
    # this is (float(amax) / top).clamp_min(tiny) rounded to x's dtype, as before.
    scale = (amax / top).clamp_min(torch.finfo(x.dtype).tiny)
    # x / float32 scale promotes to float32: float(x) / float(scale) in one kernel, no float32 copy of x.
    return torch.round(x / scale.float()).clamp_(-top, top), scale


def quantize_slots(x: torch.Tensor, slot_dim: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (values, scales in x's dtype), as a low-bit cache stores them (`_rounded_levels`): 8 bits, int8 values;
    4 bits, uint8 with two values per byte along the last dim (even). Not differentiable (see fake_quantize)."""
    levels, scale = _rounded_levels(x, slot_dim, bits)
    values = levels.to(torch.int8)
    if bits == 4:  # low nibble: even positions, high nibble: odd ones (two's complement)
        values = ((values[..., 0::2] & 0xF) | (values[..., 1::2] << 4)).view(torch.uint8)
    return values, scale


def quantize_into_static_slot(value: torch.Tensor, stored: torch.Tensor, scales: torch.Tensor, slot_dim: int,
                              slot: torch.Tensor, rows: torch.Tensor | None, bits: int) -> None:
    """A static decode step's low-bit write: the new token (1 along slot_dim) rounded by quantize_slots, its values
    and scale written into slot[b] of row b (_write_static_slot). kernels/dispatch.py's fused_slot_write runs it as
    one kernel where it applies."""
    values, scale = quantize_slots(value, slot_dim, bits)
    _write_static_slot(stored, slot_dim, slot, values, rows)
    _write_static_slot(scales, slot_dim, slot, scale, rows)


_quantize_into_static_slot = (fused_slot_write(quantize_into_static_slot) if fused_slot_write is not None
                              else quantize_into_static_slot)


def dequantize_slots(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.uint8:  # 4 bits, two per byte: shifts on int8 sign-extend each nibble
        packed = values.view(torch.int8)
        values = torch.stack([(packed << 4) >> 4, packed >> 4], dim=-1).flatten(-2)
    return (values.float() * scale.float()).to(scale.dtype)


class DequantizedSlots(Mapping):
    """A low-bit layer's attendable slots as the storage holds them (int8 values, scales), dequantized per name on
    first access (what the PyTorch paths read). A kernel that reads int8 itself takes `stored(name)` and never makes
    the dequantized copy, so decoding reads the fewer bytes."""

    def __init__(self, stored: dict[str, torch.Tensor]):
        self._stored = stored
        self._names = [name for name in stored if not name.endswith(SCALE_SUFFIX)]
        self._dequantized: dict[str, torch.Tensor] = {}

    def stored(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stored[name], self._stored[name + SCALE_SUFFIX]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._dequantized:
            self._dequantized[name] = dequantize_slots(*self.stored(name))
        return self._dequantized[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def fake_quantize(x: torch.Tensor, slot_dim: int, bits: int) -> torch.Tensor:
    """x rounded as a low-bit cache holds it, with the gradient of the identity (straight-through): the model
    trains against the values it will be served, and its projections still learn. The levels times their scales,
    as dequantize_slots computes them, without packing them into bytes (training never stores them)."""
    levels, scale = _rounded_levels(x, slot_dim, bits)
    return x + ((levels * scale.float()).to(scale.dtype) - x).detach()


class LayerStorage:
    """One layer's cached tensors, each with a slot (token) axis laid out by the layer's SlotLayout.

    Holds only what the spec needs (see `cached_slot_dims`); a kv_from consumer holds nothing.
    PyramidKV seam: selecting tokens after prefill means gathering these tensors along the slot axis and
    giving the layer its own SlotLayout (per-(batch, kv-head) selection would make token_index [B, K, C]);
    everything that reads slots goes through SlotPlan, so that is the only place it needs to change.
    """

    def __init__(self, layout: SlotLayout, layer: LayerSpec, pyramid: PyramidKV | None = None):
        self.layout = layout
        self.slot_dims = cached_slot_dims(layer)
        self.cache_bits = layer.cache_bits
        self.tensors: dict[str, torch.Tensor] = {}
        self.pyramid = pyramid  # the cache's PyramidKV, if any

    def update(self, plan: SlotPlan, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Writes the new tokens' entries and returns every attendable slot (cached, then new) as attention reads
        it: a low-bit cache stores int8 values and scales, and returns them as DequantizedSlots (dequantized, they
        are the values that `fake_quantize` gives the same tokens without a cache)."""
        if self.cache_bits is None:
            return self._write(plan, new)
        allocated = all(name in self.tensors and self.tensors[name].shape[self.slot_dims[name]] >= plan.capacity
                        for name in new)
        if plan.static_slot is not None and allocated:
            # static decode into storage the prefill allocated: round and write in place (one kernel per tensor
            # where the dispatch has one), then attend over the whole storage as _write's static branch does
            attendable = {}
            for name, value in new.items():
                stored, scales = self.tensors[name], self.tensors[name + SCALE_SUFFIX]
                _quantize_into_static_slot(value, stored, scales, self.slot_dims[name], plan.static_slot,
                                           plan.static_rows, self.cache_bits)
                attendable[name], attendable[name + SCALE_SUFFIX] = stored, scales
            return DequantizedSlots(attendable)
        packed = {}
        for name, value in new.items():
            packed[name], packed[name + SCALE_SUFFIX] = quantize_slots(value, self.slot_dims[name], self.cache_bits)
        return DequantizedSlots(self._write(plan, packed))

    def _write(self, plan: SlotPlan, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        attendable = {}
        for name, value in new.items():
            slot_dim = self.slot_dims[name]
            stored = _grow_slots(self.tensors.get(name), plan.capacity, slot_dim, value)
            self.tensors[name] = stored
            if plan.static_slot is not None:  # static decode: write in place, attend over the whole storage
                _write_static_slot(stored, slot_dim, plan.static_slot, value, plan.static_rows)
                attendable[name] = stored
                continue
            if plan.is_ring:
                # Read before writing: the ring may evict tokens that this step's queries still see.
                cached = stored.narrow(slot_dim, 0, plan.cached_slots)
                attendable[name] = torch.cat([cached, value], dim=slot_dim)
                _write_slots(stored, slot_dim, plan, value)
            else:
                _write_slots(stored, slot_dim, plan, value)
                attendable[name] = stored.narrow(slot_dim, 0, plan.start + value.shape[slot_dim])
        return attendable

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def select_batch(self, indices: torch.Tensor) -> None:
        self.tensors = {name: t[indices] for name, t in self.tensors.items()}

    def crop(self, length: int) -> None:
        for name, t in self.tensors.items():
            t.narrow(self.slot_dims[name], length, t.shape[self.slot_dims[name]] - length).zero_()


class KVForgeCache(Cache):
    """The compressed KV cache: per layer only what its LayerSpec needs (see docs/ARCHITECTURE.md).

    dense / merged_heads: key, value [B, K, C, D]; low_rank pre_rope_latent: k_latent [B, C, Rk], v_latent
    [B, C, Rv]; low_rank partial: kv_latent [B, C, R] + k_rope [B, K, C, Dr] (rotated), with rope_shared
    k_rope [B, 1, C, Dr] (one rotary key for every head, DeepSeek MLA's cache); probs_from: values
    only; kv_from: nothing. C = slot capacity: window + sinks for window layers (a ring), the sequence so far
    for global layers. Global layers are sized once from generate()'s max length when known (so after a full
    generate() the capacity is exactly the tokens held), else grown in chunks of SlotLayout.GROWTH_CHUNK.
    GQA heads are never expanded to query heads here.

    Written only by KVForgeModel / KVForgeAttention (Cache.update(key, value) does not apply).
    """

    def __init__(self, config: KVForgeConfig, max_cache_len: int | None = None, pyramid=None, static: bool = False,
                 cuda_graphs: bool = True, compile_step: bool = False):
        """pyramid: PyramidKV settings (PyramidSettings or a mapping); None applies the config's
        `compression.inference.pyramid` if it has one, False keeps every token even then.

        static=True: storage is allocated once, at `max_cache_len` tokens (window layers: their ring), by the
        prefill; each later one-token step writes and attends with device-side indices only and fixed shapes, so
        a decode step can be captured as a CUDA graph or compiled (its tensors never move). Decode tokens must be
        real (generate() appends ones to the attention mask); no PyramidKV, no beam reordering. On a GPU the step
        is captured as one CUDA graph on its first use and replayed after (`cuda_graphs=False`: run eagerly).
        compile_step=True (static only): the step's PyTorch ops are compiled with torch.compile first (Inductor fuses
        the norms, RoPE, activations and casts that a CUDA graph still replays one kernel each; the Triton decode
        kernels launch between the compiled parts); the first compiled step of a model is checked against the
        uncompiled one, and a failure or disagreement decodes uncompiled from then on (KVForgeModel._decode_step).
        """
        spec = config.compression_spec
        settings = spec.pyramid if pyramid is None else (pyramid or None)
        if compile_step and not static:
            raise ValueError("KVForgeCache(compile_step=True) needs static=True: only a static cache's decode step has "
                             "the fixed shapes a compiled step needs")
        if static and (max_cache_len is None or settings is not None):
            raise ValueError("KVForgeCache(static=True) needs max_cache_len (prompt + new tokens) and no PyramidKV "
                             f"(got max_cache_len={max_cache_len}, pyramid={'on' if settings is not None else 'off'})")
        self.pyramid = PyramidKV(PyramidSettings.from_any(settings), spec.layers) if settings is not None else None
        self.static = static
        self.cuda_graphs = cuda_graphs
        self.compile_step = compile_step
        self._decode_graph = None
        self.layouts: dict[tuple, SlotLayout] = {}
        storages = []
        for layer in spec.layers:
            if layer.layout not in self.layouts:
                self.layouts[layer.layout] = SlotLayout(*layer.layout, max_cache_len=max_cache_len, static=static)
            storages.append(LayerStorage(self.layouts[layer.layout], layer, self.pyramid))
        super().__init__(layers=storages)
        self.layer_specs = spec.layers
        self._seq_length = 0
        self.valid_counts: torch.Tensor | None = None  # [B] real (non-padding) tokens seen per row

    # ---- written by KVForgeModel -------------------------------------------------------------------
    def query_index(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Index among each row's real tokens of the T new tokens (new_valid [B, T] bool); -1 for padding."""
        if self.valid_counts is None:
            return _token_index(new_valid, new_valid.new_zeros(new_valid.shape[0], dtype=torch.long))
        if self.valid_counts.shape[0] != new_valid.shape[0]:
            raise ValueError(
                f"the cache holds batch size {self.valid_counts.shape[0]} but this forward has batch size "
                f"{new_valid.shape[0]}; start a new KVForgeCache for a new batch"
            )
        return _token_index(new_valid, self.valid_counts)

    def commit(self, plans: dict[tuple, SlotPlan], new_valid: torch.Tensor, query_positions: torch.Tensor) -> None:
        for key, plan in plans.items():
            self.layouts[key].commit(plan, query_positions)
        counts = new_valid.sum(dim=1)
        if self.valid_counts is None:
            self.valid_counts = counts
        elif self.static:
            self.valid_counts.add_(counts)  # in place: a captured decode step reads this tensor
        else:
            self.valid_counts = self.valid_counts + counts
        self._seq_length += new_valid.shape[1]

    def static_decode(self, step: Callable, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                      new_valid: torch.Tensor) -> torch.Tensor:
        """Runs `step(inputs_embeds, position_ids, new_valid, cache)` (KVForgeModel._static_decode_step: one token
        per row, device work only) eagerly, or on a GPU as a CUDA graph captured on the first call, then advances
        the counters outside it (a graph's warm-up runs the step once more, which its writes allow but a counter
        would not)."""
        if self.cuda_graphs and inputs_embeds.is_cuda:
            hidden_states = self._graph_step(step, inputs_embeds, position_ids, new_valid)
        else:
            hidden_states = step(inputs_embeds, position_ids, new_valid, self)
        self.valid_counts.add_(new_valid.sum(dim=1))
        for layout in self.layouts.values():
            if not layout.is_ring:
                layout.length += 1
                layout.length_on_device.add_(1)
        self._seq_length += 1
        return hidden_states

    def _graph_step(self, step: Callable, inputs_embeds, position_ids, new_valid) -> torch.Tensor:
        if self._decode_graph is None:
            inputs = (inputs_embeds.clone(), position_ids.clone(), new_valid.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graphs asks
                step(*inputs, self)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    output = step(*inputs, self)
            except RuntimeError as error:  # a layout or kernel the installed torch cannot capture: run eagerly
                logger.warning("KVForgeCache: CUDA graph capture of the decode step failed (%s); decoding without "
                               "graphs", error)
                self.cuda_graphs = False
                return step(inputs_embeds, position_ids, new_valid, self)
            self._decode_graph = (graph, inputs, output)
        graph, inputs, output = self._decode_graph
        for buffer, value in zip(inputs, (inputs_embeds, position_ids, new_valid)):
            buffer.copy_(value)
        graph.replay()
        return output

    # ---- measurements ------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        """Bytes of the K/V tensors actually allocated (slot capacity, not just tokens written)."""
        return sum(storage.num_bytes() for storage in self.layers)

    def metadata_bytes(self) -> int:
        """Bytes of the slot bookkeeping (token index and position per slot, shared by a layout's layers)."""
        total = sum(t.numel() * t.element_size() for layout in self.layouts.values()
                    for t in (layout.token_index, layout.positions) if t is not None)
        return total + (self.valid_counts.numel() * 8 if self.valid_counts is not None else 0)

    def kv_bytes_per_token(self) -> float:
        """cache_bytes() / (batch x sequence positions held, left padding included)."""
        if self._seq_length == 0:
            raise ValueError("the cache is empty: run a forward pass or generate() first")
        return self.cache_bytes() / (self.batch_size * self._seq_length)

    def named_tensors(self):
        """(layer_idx, name, tensor) for every allocated cache tensor."""
        for idx, storage in enumerate(self.layers):
            for name, tensor in storage.tensors.items():
                yield idx, name, tensor

    # ---- Cache API used by generate() ----------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise TypeError(
            "KVForgeCache is written by KVForgeAttention through its layer storages; Cache.update(key, value) does "
            "not apply to compressed layers"
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Sequence positions processed so far (same for every layer; window layers keep fewer slots)."""
        return self._seq_length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layout = self.layers[layer_idx].layout
        return (layout.capacity if layout.is_ring else self._seq_length) + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.valid_counts is None else self.valid_counts.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.valid_counts is not None and self._seq_length > 0

    @property
    def is_croppable(self) -> bool:
        compacted = self.pyramid is not None and self.pyramid.compacted
        return not compacted and not any(layout.is_ring for layout in self.layouts.values())

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.is_window for layer in self.layer_specs]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def reset(self) -> None:
        """Empties the cache for the next generate(). A static cache that holds tokens is emptied in place: its
        storage zeroed, its slots marked empty, its counters zeroed, every tensor where it was, so the decode step
        it captured as a CUDA graph replays for the next batch of the same size instead of being captured again
        (transformers reuses its StaticCache across generate() calls the same way). Other caches drop their
        tensors."""
        if self.static and self.valid_counts is not None:
            for storage in self.layers:
                for tensor in storage.tensors.values():
                    tensor.zero_()  # as fresh storage holds: never stale values under a masked slot's zero weight
            for layout in self.layouts.values():
                layout.clear()
            self.valid_counts.zero_()
            self._seq_length = 0
            return
        self._decode_graph = None  # it read the tensors dropped below
        if self.pyramid is not None:  # back to the layouts before compaction, and a PyramidKV that observes again
            self.pyramid = PyramidKV(self.pyramid.settings, self.layer_specs)
            self.layouts = {key: layout for key, layout in self.layouts.items() if key[0] != "pyramid"}
        for storage, layer in zip(self.layers, self.layer_specs):
            storage.tensors = {}
            storage.layout = self.layouts[layer.layout]
            storage.pyramid = self.pyramid
        for layout in self.layouts.values():
            layout.reset()
        self._seq_length = 0
        self.valid_counts = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for storage in self.layers:
            storage.select_batch(indices)
        for layout in self.layouts.values():
            layout.select_batch(indices)
        if self.valid_counts is not None:
            self.valid_counts = self.valid_counts[indices]
        self._decode_graph = None  # it read the tensors just replaced

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.valid_counts is not None:
            self.batch_select_indices(
                torch.arange(self.valid_counts.shape[0], device=self.valid_counts.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last -tokens_to_remove positions (a positive value is the length to keep, as in
        DynamicCache); global layouts only."""
        keep = self._seq_length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self._seq_length)
        if keep == self._seq_length:
            return
        if self.pyramid is not None and self.pyramid.compacted:
            raise ValueError("cannot crop a cache compacted by PyramidKV: its slots no longer map to positions")
        if not self.is_croppable:
            windows = sorted({layout.window for layout in self.layouts.values() if layout.is_ring})
            raise ValueError(
                f"cannot crop a cache with window layers (window={windows}): their ring buffers have already "
                f"evicted tokens that cropping would need back"
            )
        for layout in self.layouts.values():
            layout.crop(keep)
        for storage in self.layers:
            storage.crop(keep)
        if self.valid_counts is not None:
            self.valid_counts = (self.layouts[(None, 0)].token_index[:, :keep] >= 0).sum(dim=1)
        self._seq_length = keep

    def early_initialization(self, *args, **kwargs):
        raise NotImplementedError("KVForgeCache allocates on the first forward (its layers differ in shape)")

    def __repr__(self) -> str:
        return f"KVForgeCache(layers={len(self.layers)}, seq_length={self._seq_length}, bytes={self.cache_bytes()})"


def _token_index(new_valid: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    index = seen[:, None] + new_valid.long().cumsum(dim=1) - 1
    return index.masked_fill(~new_valid, -1)


# ================================================================================================
# Attention, one function per cache representation (the seam for Triton kernels)
# ================================================================================================


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # finfo.min instead of -inf: a row can never be all masked (visibility_mask), but stay finite regardless.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """query [B, K, G, T, d] . key [B, K, S, d] -> [B, K, G, T, S], without expanding key to G heads."""
    batch, heads, group, length, dim = query.shape
    return torch.matmul(query.reshape(batch, heads, group * length, dim), key.transpose(-1, -2)).view(
        batch, heads, group, length, -1)


def _weighted_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs [B, K, G, T, S] @ value [B, K, S, Dv] -> [B, K, G, T, Dv]."""
    batch, heads, group, length, slots = probs.shape
    return torch.matmul(probs.reshape(batch, heads, group * length, slots), value).view(batch, heads, group, length, -1)


def _latent_values(probs: torch.Tensor, latent: torch.Tensor, up: nn.Linear, absorb: bool) -> torch.Tensor:
    """sum_s p_s (U c_s + b) for probs [B, K, G, T, S], latent [B, S, R], up: R -> K * Dv; -> [B, K, G, T, Dv].

    absorb=False rebuilds the values by calling `up` as a module (training takes this path; the module's own
    hooks, e.g. ZeRO-3's parameter gathering, fire even when a kv_from consumer calls its producer's `up`).
    absorb=True attends over the latent and up-projects once per query, exact since
    sum_s p_s (U c_s + b) = U (sum_s p_s c_s) + b sum_s p_s: O(H T S R + H T R Dv) instead of O(S R K Dv),
    the decode form (reads up.weight directly).
    """
    batch, heads, group, length, slots = probs.shape
    if not (absorb and _is_plain_linear(up)):
        value = up(latent).view(batch, slots, heads, -1).transpose(1, 2)  # [B, K, S, Dv]
        return _weighted_values(probs, value)
    mixed = torch.matmul(probs.reshape(batch, heads * group * length, slots), latent)  # [B, K*G*T, R]
    mixed = mixed.view(batch, heads, group * length, -1)
    weight = up.weight.view(heads, -1, up.weight.shape[-1])  # [K, Dv, R]
    out = torch.matmul(mixed, weight.transpose(-1, -2)).view(batch, heads, group, length, -1)
    if up.bias is not None:  # sum_s p_s is 1 except under dropout
        out = out + up.bias.view(heads, 1, 1, -1) * probs.sum(dim=-1, keepdim=True)
    return out


def _is_plain_linear(*modules: nn.Module) -> bool:
    # The absorbed forms read .weight / .bias; a wrapped projection (e.g. a LoRA adapter before merging)
    # computes more than that, so it is always called as a module.
    return all(type(module) is nn.Linear for module in modules)


def _dropout(probs: torch.Tensor, dropout: float) -> torch.Tensor:
    return F.dropout(probs, p=dropout, training=True) if dropout > 0 else probs


def kv_attention(query, key, value, mask, scaling, *, need_probs=False, dropout=0.0, use_sdpa=False, causal=False,
                 k_scale=None, v_scale=None):
    """Dense / merged-heads cache, and the training / prefill form of the latent ones (`dense_kv`).

    query [B, K, G, T, D] (rotated); key [B, K, S, D], value [B, K, S, Dv] (keys rotated); mask [B or 1, 1, 1,
    T, S]. causal=True promises that the mask is the plain causal one (T == S, no padding, no window in reach):
    SDPA then takes is_causal and no mask, and GQA as is. Without it SDPA gets the boolean mask and key / value
    expanded to H heads (not every fused kernel that takes a mask takes GQA, and the math fallback would hold the
    [T, S] scores), or, under one mask for the batch, each KV head's G query heads as G x T rows of one head.
    Either way no [T, S] score matrix is held (on an H200 both run cuDNN's fused attention, docs/TRAINING.md); the
    explicit softmax below is the reference and serves need_probs.
    An 8-bit cache (cache_bits) gives int8 key and value with their scales k_scale, v_scale [B, 1, S, 1].
    Returns out [B, K, G, T, Dv] and probs [B, K, G, T, S] (pre-dropout; None unless need_probs).
    """
    if k_scale is not None:
        key, value = dequantize_slots(key, k_scale), dequantize_slots(value, v_scale)
    batch, heads, group, length, dim = query.shape
    if use_sdpa and not need_probs and length == 1 and not causal and mask.shape[1] == mask.shape[2] == 1:
        # One new token (decode) under one mask row for every head (a PyramidKV cache's per-head masks take the
        # path below): a kv head's G query heads are G queries over the same keys, so SDPA takes them as the query
        # length of K heads, with no copy of the keys and values expanded to H heads (which read and wrote H/K
        # times the whole cache per layer and step).
        out = F.scaled_dot_product_attention(query.view(batch, heads, group, dim), key, value, attn_mask=mask[:, 0],
                                             dropout_p=dropout, scale=scaling)
        return out.view(batch, heads, group, length, -1), None
    if use_sdpa and not need_probs:
        query = query.reshape(batch, heads * group, length, dim)
        if causal:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scaling,
                                                 enable_gqa=group > 1)
        elif group > 1 and mask.shape[0] == mask.shape[1] == mask.shape[2] == 1:
            # One mask row for the batch (no padding): each KV head's G query heads become G x T query rows over its
            # keys and values as they are, under the mask tiled G times along the rows (once for the batch), rather
            # than every row's keys and values expanded to H heads (at 32k slots ~72 MiB per batch row for SmolLM2).
            rows = mask[0, 0, 0].expand(group, -1, -1).reshape(1, 1, group * length, -1)
            out = F.scaled_dot_product_attention(query.reshape(batch, heads, group * length, dim), key, value,
                                                 attn_mask=rows, dropout_p=dropout, scale=scaling)
        else:
            if group > 1:  # [B, K, S, D] -> [B, H, S, D], head h reading kv head h // G
                key = key[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, heads * group, *key.shape[2:])
                value = value[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, heads * group,
                                                                                 *value.shape[2:])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, 0], dropout_p=dropout,
                                                 scale=scaling)
        return out.view(batch, heads, group, length, -1), None
    probs = _masked_softmax(_scores(query, key) * scaling, mask, query.dtype)
    return _weighted_values(_dropout(probs, dropout), value), (probs if need_probs else None)


def pre_rope_latent_keys(k_latent, k_up, key_rotary):
    """Pre-RoPE key latents [B, S, Rk] -> keys [B, K, S, D]: one GEMM for all heads, then RoPE at the keys'
    positions."""
    batch, slots, _ = k_latent.shape
    key_cos, key_sin = key_rotary.tables()
    key = k_up(k_latent).view(batch, slots, -1, key_cos.shape[-1]).transpose(1, 2)  # [B, K, S, D]
    return apply_rotary(key, key_cos[:, None], key_sin[:, None])


def pre_rope_latent_kv(k_latent, v_latent, k_up, v_up, key_rotary):
    """Pre-RoPE latents [B, S, Rk], [B, S, Rv] -> key [B, K, S, D] (rotated), value [B, K, S, D]."""
    key = pre_rope_latent_keys(k_latent, k_up, key_rotary)
    batch, heads, slots, _ = key.shape
    value = v_up(v_latent).view(batch, slots, heads, -1).transpose(1, 2)  # [B, K, S, D]
    return key, value


def partial_rope_kv(k_rope, kv_latent, k_up, v_up, rope_index, head_dim):
    """Partial-RoPE cache -> key [B, K, S, D] in the head's own dim order (rotary dims from k_rope, the others
    up-projected from the latent), value [B, K, S, D]. With the query's rotary dims rotated and the others not
    (`partial_rope_query`), q . k equals partial_rope_attention's q_rope . k_rope + q_nope . (U_k c)."""
    batch, heads, slots, _ = k_rope.shape
    rope_dims, nope_dims = partial_rope_dims(rope_index, head_dim)
    k_nope = k_up(kv_latent).view(batch, slots, heads, -1).transpose(1, 2)  # [B, K, S, Dn]
    # [k_rope | k_nope] holds head dims cat(rope_dims, nope_dims); the inverse permutation puts them in place.
    order = torch.cat([rope_dims, nope_dims], dim=1).argsort(dim=1)  # [K, D]
    key = _gather_dims(torch.cat([k_rope, k_nope], dim=-1), order)
    value = v_up(kv_latent).view(batch, slots, heads, -1).transpose(1, 2)  # [B, K, S, D]
    return key, value


def shared_rope_kv(k_rope, kv_latent, k_up, v_up, num_kv_heads):
    """Shared-rotary cache -> key [B, K, S, D + Dr] = [k_nope | the one rotary key], value [B, K, S, D]: the
    training / prefill form, for a query laid out [q_nope | q_rope rotated] (`KVForgeAttention.attend`)."""
    batch, slots, _ = kv_latent.shape
    k_nope = k_up(kv_latent).view(batch, slots, num_kv_heads, -1).transpose(1, 2)  # [B, K, S, D]
    key = torch.cat([k_nope, k_rope.expand(-1, num_kv_heads, -1, -1)], dim=-1)
    value = v_up(kv_latent).view(batch, slots, num_kv_heads, -1).transpose(1, 2)  # [B, K, S, D]
    return key, value


def partial_rope_query(query, rotated, rope_index):
    """query, rotated [B, K, G, T, D] (unrotated / fully rotated) -> rotated in the rotary dims of each kv head's
    rope_index, unrotated elsewhere (one select, no gather)."""
    heads, dim = query.shape[1], query.shape[-1]
    half = dim // 2
    is_rope = torch.zeros(heads, half, dtype=torch.bool, device=query.device)
    is_rope.scatter_(1, rope_index, True)
    is_rope = torch.cat([is_rope, is_rope], dim=1).view(1, heads, 1, 1, dim)  # pair f = dims f and f + D/2
    return torch.where(is_rope, rotated, query)


def pre_rope_latent_attention(query, k_latent, v_latent, k_up, v_up, key_rotary, mask, scaling, *,
                              need_probs=False, dropout=0.0, use_sdpa=False, absorb=None, k_scale=None, v_scale=None):
    """Low-rank cache with RoPE after the up-projection (Eigen Attention style).

    query [B, K, G, T, D] (rotated); k_latent [B, S, Rk], v_latent [B, S, Rv]; k_up: Rk -> K*D and
    v_up: Rv -> K*D (the producer's nn.Linear modules); key_rotary: KeyRotary at the keys' positions.
    Keys are rebuilt and rotated here: RoPE sits between q and k_up, so k_up cannot fold into the query.
    The value up-projection is absorbed (`_latent_values`) by default for one query token (decode).
    An 8-bit cache (cache_bits) gives int8 latents with their scales k_scale, v_scale [B, S, 1].
    """
    if k_scale is not None:
        k_latent, v_latent = dequantize_slots(k_latent, k_scale), dequantize_slots(v_latent, v_scale)
    length = query.shape[3]
    absorb = (length == 1) if absorb is None else absorb
    if not absorb:
        key, value = pre_rope_latent_kv(k_latent, v_latent, k_up, v_up, key_rotary)
        return kv_attention(query, key, value, mask, scaling, need_probs=need_probs, dropout=dropout, use_sdpa=use_sdpa)
    key = pre_rope_latent_keys(k_latent, k_up, key_rotary)  # [B, K, S, D]
    probs = _masked_softmax(_scores(query, key) * scaling, mask, query.dtype)
    return _latent_values(_dropout(probs, dropout), v_latent, v_up, absorb=True), (probs if need_probs else None)


def partial_rope_attention(query_rope, query_nope, k_rope, kv_latent, k_up, v_up, mask, scaling, *,
                           need_probs=False, dropout=0.0, absorb=None, k_rope_scale=None, kv_latent_scale=None):
    """Partial-RoPE joint-latent cache (MHA2MLA), and its shared-rotary form (DeepSeek MLA).

    query_rope [B, K, G, T, Dr] (rotated), query_nope [B, K, G, T, Dn]; k_rope [B, K, S, Dr] (rotated, cached
    as is), or [B, 1, S, Dr] when one rotary key serves every head (broadcast, never expanded); kv_latent
    [B, S, R]; k_up: R -> K*Dn, v_up: R -> K*D (the producer's modules).
    score = q_rope . k_rope + q_nope . (U_k c). Absorbed form (default for one query token): fold U_k into
    the query, attend over the latent, then apply U_v once -- exact, and the non-rotary keys are never
    materialized. An 8-bit cache (cache_bits) gives int8 k_rope and kv_latent with their scales k_rope_scale
    [B, 1, S, 1] and kv_latent_scale [B, S, 1].
    """
    if kv_latent_scale is not None:
        k_rope, kv_latent = dequantize_slots(k_rope, k_rope_scale), dequantize_slots(kv_latent, kv_latent_scale)
    batch, heads, group, length, _ = query_rope.shape
    slots = kv_latent.shape[1]
    absorb = ((length == 1) if absorb is None else absorb) and _is_plain_linear(k_up, v_up)
    scores = _scores(query_rope, k_rope)
    if absorb:
        up_k = k_up.weight.view(heads, -1, k_up.weight.shape[-1])  # [K, Dn, R]
        query_latent = torch.matmul(query_nope.reshape(batch, heads, group * length, -1), up_k)  # [B, K, G*T, R]
        scores = scores + torch.matmul(
            query_latent.reshape(batch, heads * group * length, -1), kv_latent.transpose(1, 2)
        ).view(batch, heads, group, length, slots)
    else:
        k_nope = k_up(kv_latent).view(batch, slots, heads, -1).transpose(1, 2)  # [B, K, S, Dn]
        scores = scores + _scores(query_nope, k_nope)
    probs = _masked_softmax(scores * scaling, mask, query_rope.dtype)
    out = _latent_values(_dropout(probs, dropout), kv_latent, v_up, absorb)
    return out, (probs if need_probs else None)


def shared_probs_attention(probs, value=None, v_latent=None, v_up=None, *, dropout=0.0, absorb=None):
    """probs_from consumer: another layer's probabilities [B, Kv, Gv, T, S] over this layer's values, either
    value [B, Kv, S, D] or v_latent [B, S, Rv] with v_up: Rv -> Kv*D. No q, no k, no QK product."""
    probs = _dropout(probs, dropout)
    if value is not None:
        return _weighted_values(probs, value), None
    absorb = (probs.shape[3] == 1) if absorb is None else absorb
    return _latent_values(probs, v_latent, v_up, absorb), None


# ================================================================================================
# Cache representations: per kind of cache, its modules, what it caches and how queries attend over it
# ================================================================================================


def _rotated(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """query [B, K, G, T, D] rotated by cos, sin [B, T, D]."""
    return apply_rotary(query, cos[:, None, None], sin[:, None, None])


class CacheRepresentation:
    """What a layer caches per slot (LayerSpec.representation), and everything that depends on it: the K/V-side
    submodules of a KVForgeAttention (`build`), the new tokens' cache entries (`project`: the tensors that
    configuration_kvforge.CACHED_TENSORS lists with their slot axes and sizes), and attention over a producer's
    attendable slots (`attend`), through the PyTorch reference `reference` or the kernel dispatch's `kernel`.

    Several new tokens (training, prefill) attend through `kv_attention` over whole K / V (`whole_kv`; a latent
    cache is up-projected once per step, SharedKV.dense_kv); the latent representations attend one new token
    (decode) through their own function, whose absorbed form never rebuilds K / V and where fused kernels plug in.
    Stateless: one instance per name, in CACHE_REPRESENTATIONS.
    """

    name: str
    kernel: str | None = None  # the name `attention_function` and kernels/dispatch.py serve `reference` under
    reference: Callable | None = None

    def build(self, attention: "KVForgeAttention", layer: LayerSpec, hidden: int, heads: int, kv_heads: int,
              head_dim: int, bias: bool) -> None:
        """Registers the submodules that compute the cache on `attention` (q_proj and o_proj are its own)."""

    def project(self, attention: "KVForgeAttention", x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> dict[str, torch.Tensor]:
        """The new tokens' cache entries: x [B, T, E], cos, sin [B, T, D]."""
        return {}

    def query(self, attention: "KVForgeAttention", x: torch.Tensor) -> torch.Tensor:
        """x [B, T, E] -> query [B, H, T, D], unrotated."""
        batch, length, _ = x.shape
        return attention.q_proj(x).view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)

    def dense_kv(self, tensors: dict[str, torch.Tensor], producer: "KVForgeAttention", plan: SlotPlan):
        """key (rotated), value [B, K, S, D] from the attendable cache tensors."""
        raise AssertionError(f"a {self.name!r} cache is attended as it is")

    def whole_kv(self, shared: "SharedKV", query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 plan: SlotPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query [B, K, G, T, D'] unrotated -> the query, key and value that `kv_attention` takes."""
        raise AssertionError(f"a {self.name!r} layer caches no keys")

    def attend(self, shared: "SharedKV", query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: SlotPlan,
               scaling: float, need_probs: bool, dropout: float, use_sdpa: bool):
        """query [B, K, G, T, D'] unrotated -> out [B, K, G, T, D], probs [B, K, G, T, S] | None, through SDPA
        where allowed (the plan decides the mask once per layout and step)."""
        query, key, value = self.whole_kv(shared, query, cos, sin, plan)
        if use_sdpa and not need_probs:
            mask, causal = plan.sdpa_mask()
        else:
            mask, causal = plan.mask, False
        return attention_function("kv")(query, key, value, mask, scaling, need_probs=need_probs, dropout=dropout,
                                        use_sdpa=use_sdpa, causal=causal)

    def attend_probs(self, attention: "KVForgeAttention", probs: torch.Tensor, values: dict[str, torch.Tensor],
                     dropout: float):
        """probs_from consumer: probs [B, K, G, T, S] over its own cached values -> out [B, K, G, T, D], None."""
        raise AssertionError(f"a {self.name!r} layer computes its own probabilities")


class DenseKV(CacheRepresentation):
    """key, value [B, K, C, D] (keys rotated): dense layers, and merged heads with K = the merged count."""

    name, kernel, reference = "kv", "kv", staticmethod(kv_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        attention.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)

    def project(self, attention, x, cos, sin):
        batch, length, _ = x.shape
        key = attention.k_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)  # [B, K, T, D]
        value = attention.v_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        return {"key": apply_rotary(key, cos[:, None], sin[:, None]), "value": value}

    def whole_kv(self, shared, query, cos, sin, plan):
        return _rotated(query, cos, sin), shared.tensors["key"], shared.tensors["value"]

    def attend(self, shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa):
        t = shared.tensors
        if query.shape[3] > 1 or not isinstance(t, DequantizedSlots):
            return super().attend(shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa)
        # Decode over an 8-bit cache: the int8 keys and values and their scales, as the cache holds them.
        (key, value), scales = _as_stored(t, key="k_scale", value="v_scale")
        return attention_function(self.kernel)(_rotated(query, cos, sin), key, value, plan.mask, scaling,
                                               need_probs=need_probs, dropout=dropout, use_sdpa=use_sdpa, **scales)


class PreRopeLatent(CacheRepresentation):
    """k_latent [B, C, Rk], v_latent [B, C, Rv]: keys up-projected and rotated at attention time (Eigen Attention)."""

    name, kernel, reference = "pre_rope_latent", "pre_rope_latent", staticmethod(pre_rope_latent_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.k_down = nn.Linear(hidden, layer.k_rank, bias=bias)
        attention.k_up = nn.Linear(layer.k_rank, kv_heads * head_dim, bias=False)
        attention.v_down = nn.Linear(hidden, layer.v_rank, bias=True)
        attention.v_up = nn.Linear(layer.v_rank, kv_heads * head_dim, bias=True)

    def project(self, attention, x, cos, sin):
        return {"k_latent": attention.k_down(x), "v_latent": attention.v_down(x)}  # [B, T, Rk], [B, T, Rv]

    def dense_kv(self, tensors, producer, plan):
        return pre_rope_latent_kv(tensors["k_latent"], tensors["v_latent"], producer.k_up, producer.v_up,
                                  plan.key_rotary())

    def whole_kv(self, shared, query, cos, sin, plan):
        return _rotated(query, cos, sin), *shared.dense_kv(plan)

    def attend(self, shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa):
        if query.shape[3] > 1:
            return super().attend(shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa)
        producer = shared.producer
        (k_latent, v_latent), scales = _as_stored(shared.tensors, k_latent="k_scale", v_latent="v_scale")
        return attention_function(self.kernel)(
            _rotated(query, cos, sin), k_latent, v_latent, producer.k_up, producer.v_up, plan.key_rotary(),
            plan.mask, scaling, need_probs=need_probs, dropout=dropout, use_sdpa=use_sdpa, **scales)


def _as_stored(tensors, **scale_keywords: str) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """A cache's tensors (the names given, in order) as it holds them, and a low-bit cache's scales as the
    attention function's keyword arguments (scale_keywords: tensor name -> keyword; none in the model's dtype):
    the decode kernels read the integers themselves."""
    if isinstance(tensors, DequantizedSlots):
        stored = [tensors.stored(name) for name in scale_keywords]
        return [values for values, _ in stored], {keyword: scale for keyword, (_, scale) in
                                                   zip(scale_keywords.values(), stored)}
    return [tensors[name] for name in scale_keywords], {}


class PartialRopeLatent(CacheRepresentation):
    """kv_latent [B, C, R] + k_rope [B, K, C, Dr] (rotated): rope_index [K, Dr/2] keeps, per kv head, the frequency
    pairs that stay rotary; the other key dims and the values come from the joint latent (MHA2MLA)."""

    name, kernel, reference = "partial", "partial", staticmethod(partial_rope_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.kv_down = nn.Linear(hidden, layer.kv_rank, bias=True)
        with warnings.catch_warnings():  # all dims rotary leaves k_up empty; torch warns on initializing it
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            attention.k_up = nn.Linear(layer.kv_rank, kv_heads * (head_dim - layer.rope_dims), bias=False)
        attention.v_up = nn.Linear(layer.kv_rank, kv_heads * head_dim, bias=True)
        attention.k_rope = nn.Linear(hidden, kv_heads * layer.rope_dims, bias=bias)
        attention.register_buffer("rope_index", attention.default_rope_index(kv_heads, layer.rope_dims))

    def project(self, attention, x, cos, sin):
        batch, length, _ = x.shape
        rope_dims, _ = partial_rope_dims(attention.rope_index, attention.head_dim)
        k_rope = attention.k_rope(x).view(batch, length, -1, rope_dims.shape[1]).transpose(1, 2)  # [B, K, T, Dr]
        heads = k_rope.shape[1]
        cos_r = _gather_dims(cos[:, None].expand(-1, heads, -1, -1), rope_dims)  # [B, K, T, Dr]
        sin_r = _gather_dims(sin[:, None].expand(-1, heads, -1, -1), rope_dims)
        return {"kv_latent": attention.kv_down(x), "k_rope": apply_rotary(k_rope, cos_r, sin_r)}

    def dense_kv(self, tensors, producer, plan):
        return partial_rope_kv(tensors["k_rope"], tensors["kv_latent"], producer.k_up, producer.v_up,
                               producer.rope_index, producer.head_dim)

    def whole_kv(self, shared, query, cos, sin, plan):
        key, value = shared.dense_kv(plan)
        return partial_rope_query(query, _rotated(query, cos, sin), shared.producer.rope_index), key, value

    def attend(self, shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa):
        if query.shape[3] > 1:
            return super().attend(shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa)
        producer = shared.producer
        (k_rope, kv_latent), scales = _as_stored(shared.tensors, k_rope="k_rope_scale", kv_latent="kv_latent_scale")
        rope_dims, nope_dims = partial_rope_dims(producer.rope_index, query.shape[-1])
        return attention_function(self.kernel)(
            _gather_dims(_rotated(query, cos, sin), rope_dims), _gather_dims(query, nope_dims), k_rope, kv_latent,
            producer.k_up, producer.v_up, plan.mask, scaling, need_probs=need_probs, dropout=dropout, **scales)


class SharedRopeLatent(CacheRepresentation):
    """kv_latent [B, C, R] + ONE rotary key k_rope [B, 1, C, Dr] (rotated) for every head: DeepSeek MLA's cache.

    The query is [q_proj's D dims | q_rope's Dr dims]; every key dim goes through the joint latent, and the rotary
    key's frequencies are rope_index [1, Dr/2]. Attends through the per-head partial-RoPE function (k_rope
    broadcast over the heads), under its own kernel name: a kernel written for one rotary key per kv head must not
    receive a shared one (kernels/dispatch.py serves only the names it knows).
    """

    name, kernel, reference = "partial_shared", "partial_shared", staticmethod(partial_rope_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.q_rope = nn.Linear(hidden, heads * layer.rope_dims, bias=bias)
        attention.kv_down = nn.Linear(hidden, layer.kv_rank, bias=True)
        attention.k_up = nn.Linear(layer.kv_rank, kv_heads * head_dim, bias=False)
        attention.v_up = nn.Linear(layer.kv_rank, kv_heads * head_dim, bias=True)
        attention.k_rope = nn.Linear(hidden, layer.rope_dims, bias=bias)
        attention.register_buffer("rope_index", attention.default_rope_index(1, layer.rope_dims))

    @staticmethod
    def rope_tables(attention: "KVForgeAttention", cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, D] -> [B, T, Dr]: the frequencies of `attention`'s shared rotary key."""
        rope_dims, _ = partial_rope_dims(attention.rope_index, attention.head_dim)
        return cos.index_select(-1, rope_dims[0]), sin.index_select(-1, rope_dims[0])

    def project(self, attention, x, cos, sin):
        batch, length, _ = x.shape
        k_rope = attention.k_rope(x).view(batch, length, 1, -1).transpose(1, 2)  # [B, 1, T, Dr]
        cos_r, sin_r = self.rope_tables(attention, cos, sin)
        return {"kv_latent": attention.kv_down(x), "k_rope": apply_rotary(k_rope, cos_r[:, None], sin_r[:, None])}

    def query(self, attention, x):
        batch, length, _ = x.shape
        query = super().query(attention, x)
        query_rope = attention.q_rope(x).view(batch, length, attention.num_heads, -1).transpose(1, 2)
        return torch.cat([query, query_rope], dim=-1)  # [B, H, T, D + Dr]

    def dense_kv(self, tensors, producer, plan):
        return shared_rope_kv(tensors["k_rope"], tensors["kv_latent"], producer.k_up, producer.v_up,
                              producer.num_kv_heads)

    def _split_query(self, shared, query, cos, sin):
        """query [B, K, G, T, D + Dr] -> query_nope [.., D] unrotated, query_rope [.., Dr] rotated."""
        producer = shared.producer
        query_nope, query_rope = query.split([producer.head_dim, query.shape[-1] - producer.head_dim], dim=-1)
        cos_r, sin_r = self.rope_tables(producer, cos, sin)
        return query_nope, apply_rotary(query_rope, cos_r[:, None, None], sin_r[:, None, None])

    def whole_kv(self, shared, query, cos, sin, plan):
        query_nope, query_rope = self._split_query(shared, query, cos, sin)
        return torch.cat([query_nope, query_rope], dim=-1), *shared.dense_kv(plan)  # against [k_nope | k_rope]

    def attend(self, shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa):
        if query.shape[3] > 1:
            return super().attend(shared, query, cos, sin, plan, scaling, need_probs, dropout, use_sdpa)
        query_nope, query_rope = self._split_query(shared, query, cos, sin)
        producer = shared.producer
        (k_rope, kv_latent), scales = _as_stored(shared.tensors, k_rope="k_rope_scale", kv_latent="kv_latent_scale")
        return attention_function(self.kernel)(query_rope, query_nope, k_rope, kv_latent, producer.k_up,
                                               producer.v_up, plan.mask, scaling, need_probs=need_probs,
                                               dropout=dropout, **scales)


class Values(CacheRepresentation):
    """probs_from consumer's value [B, K, C, D] (dense or merged heads): no q, no k, another layer's attention."""

    name, kernel, reference = "v", "shared_probs", staticmethod(shared_probs_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)

    def project(self, attention, x, cos, sin):
        batch, length, _ = x.shape
        return {"value": attention.v_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)}

    def attend_probs(self, attention, probs, values, dropout):
        return attention_function(self.kernel)(probs, value=values["value"], dropout=dropout)


class ValueLatent(CacheRepresentation):
    """probs_from consumer's v_latent [B, C, Rv] (low rank): values up-projected by its own v_up."""

    name, kernel, reference = "v_latent", "shared_probs", staticmethod(shared_probs_attention)

    def build(self, attention, layer, hidden, heads, kv_heads, head_dim, bias):
        attention.v_down = nn.Linear(hidden, layer.v_rank, bias=True)
        attention.v_up = nn.Linear(layer.v_rank, kv_heads * head_dim, bias=True)

    def project(self, attention, x, cos, sin):
        return {"v_latent": attention.v_down(x)}

    def attend_probs(self, attention, probs, values, dropout):
        return attention_function(self.kernel)(probs, v_latent=values["v_latent"], v_up=attention.v_up,
                                               dropout=dropout)


class NoCache(CacheRepresentation):
    """kv_from consumer: caches nothing and attends over its producer's cache (the producer's representation)."""

    name = "none"


CACHE_REPRESENTATIONS: dict[str, CacheRepresentation] = {
    representation.name: representation
    for representation in (DenseKV(), PreRopeLatent(), PartialRopeLatent(), SharedRopeLatent(), Values(),
                           ValueLatent(), NoCache())
}

# kernel name -> PyTorch reference, the functions `attention_function` serves.
ATTENTION_FUNCTIONS: dict[str, Callable] = {
    representation.kernel: representation.reference
    for representation in CACHE_REPRESENTATIONS.values() if representation.kernel is not None
}


def attention_function(kernel: str) -> Callable:
    """The attention implementation served under a CacheRepresentation's `kernel` name: the one seam where fused
    kernels plug in.

    The kernel dispatch, when importable, wraps the PyTorch reference above in a function of the same signature
    that runs a Triton kernel where one applies (KVFORGE_KERNELS chooses; see kernels/dispatch.py) and the
    reference otherwise.
    """
    return _SERVED_ATTENTION[kernel]


# Resolved once: a plain dict read per call, which Dynamo follows in a compiled step without tracing the dispatch's
# lru_cache (whose answer it would otherwise rebuild per trace, warning that it ignores the cache).
_SERVED_ATTENTION: dict[str, Callable] = {
    kernel: reference if fused_attention is None else fused_attention(kernel, reference)
    for kernel, reference in ATTENTION_FUNCTIONS.items()
}


# ================================================================================================
# Attention module
# ================================================================================================


@dataclass
class SharedKV:
    """A producer's attendable cache for this step, as kv_from consumers read it."""

    representation: str  # the producer's, a CACHE_REPRESENTATIONS name
    tensors: Mapping[str, torch.Tensor]  # a dict, or DequantizedSlots for an 8-bit cache
    producer: "KVForgeAttention"  # gives up-projections / rope_index / kv head count
    _dense: tuple | None = field(default=None, repr=False)

    def dense_kv(self, plan: SlotPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """key (rotated), value [B, K, S, D] rebuilt from a latent cache, once per step: the producer and
        every kv_from consumer attend over the same tensors (and backpropagate into them), never recomputing
        the up-projections."""
        if self._dense is None:
            self._dense = CACHE_REPRESENTATIONS[self.representation].dense_kv(self.tensors, self.producer, plan)
        return self._dense


@dataclass
class LayerHandoff:
    """What producers hand to consumers within one forward (with or without a cache)."""

    kv: dict[int, SharedKV] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, H, T, S]


def partial_rope_dims(rope_index: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_index [K, Dr/2] (frequency pairs kept rotary per kv head) -> head dims [K, Dr] and [K, Dn].

    Pair i is dims (i, i + D/2). Rotary dims are laid out [pairs..., pairs + D/2...] (so rotate_half works
    on them, and k_rope outputs them in this order); non-rotary dims likewise in ascending pair order (k_up
    outputs them in this order).
    """
    half = head_dim // 2
    heads = rope_index.shape[0]
    is_rope = torch.zeros(heads, half, dtype=torch.bool, device=rope_index.device)
    is_rope.scatter_(1, rope_index, True)
    # The non-rotary pairs in ascending order: a stable sort puts the False entries first, in index order. (Boolean
    # indexing would do too, but it waits for the device to know the result's size: a sync per layer and step.)
    nope_pairs = torch.sort(is_rope.to(torch.uint8), dim=1, stable=True).indices[:, :half - rope_index.shape[1]]
    rope_dims = torch.cat([rope_index, rope_index + half], dim=1)
    nope_dims = torch.cat([nope_pairs, nope_pairs + half], dim=1)
    return rope_dims, nope_dims


def _gather_dims(x: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """x [B, K, ..., D], dims [K, d] -> [B, K, ..., d] (per-kv-head choice of head dims)."""
    index = dims.view(1, dims.shape[0], *([1] * (x.dim() - 3)), dims.shape[1]).expand(*x.shape[:-1], dims.shape[1])
    return torch.gather(x, -1, index)


class KVForgeAttention(nn.Module):
    """One layer's attention, with exactly the submodules its LayerSpec needs (built by its CacheRepresentation;
    docs/ARCHITECTURE.md):

        dense / merged_heads(m)   q_proj, k_proj, v_proj, o_proj          (k/v with m heads when merged)
        low_rank pre_rope_latent  q_proj, k_down, k_up, v_down, v_up, o_proj
        low_rank partial(Dr)      q_proj, kv_down, k_up, v_up, k_rope, o_proj; buffer rope_index [K, Dr/2]
        ... with rope_shared      q_proj, q_rope, kv_down, k_up, v_up, k_rope, o_proj; buffer rope_index [1, Dr/2]
        kv_from=j                 q_proj, o_proj
        probs_from=j              v_proj (or v_down, v_up), o_proj

    Biases: k_down and k_rope carry the original k bias (attention_bias). Latents holding values are a
    centred PCA: v_down / kv_down and v_up always have biases (down.bias = -U^T mean, v_up.bias = the
    values' mean); the mean passes through attention exactly since softmax weights sum to 1. k_up has
    none: a constant on pre-RoPE keys would be rotated per position (surgery factorises keys uncentred),
    and on partial-RoPE non-rotary keys it shifts all of a query's logits equally (softmax ignores it).

    Shared rotary key (rope_shared, DeepSeek-V2/V3's MLA with q_lora_rank=None): q_proj keeps every head's D dims,
    all of them non-rotary (against k_up's D dims per kv head); q_rope adds Dr rotary dims per query head against
    ONE rotary key k_rope (Dr dims, cached once). Scores are scaled by D^-1/2 like the original's. Biases as in
    the per-head layout (q_rope and k_rope iff attention_bias). DeepSeek also RMS-normalises the latent
    (kv_a_layernorm); this layout does not, since a norm makes surgery inexact (each token's latent scaled by
    1 / its RMS: 16% attention-output error on a tiny Llama at full rank against 0.9% without it); the stock
    export builds the norm an exact-to-rounding equivalent instead (models/stock.py).
    """

    def __init__(self, config: KVForgeConfig, layer_idx: int, spec=None):
        super().__init__()
        spec = spec if spec is not None else config.compression_spec
        layer = spec.layers[layer_idx]
        self.config = config
        self.layer_idx = layer_idx
        self.layer_spec = layer
        self.cache_representation = CACHE_REPRESENTATIONS[layer.representation]
        self.cached_slot_dims = cached_slot_dims(layer)  # what fake_quantize rounds per slot (8-bit caches)
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        # Whether later layers read this layer's K/V or probabilities (then it hands them over).
        self.shares_kv = any(other.kv_from == layer_idx for other in spec.layers)
        self.shares_probs = any(other.probs_from == layer_idx for other in spec.layers)

        hidden, heads, dim = config.hidden_size, self.num_heads, self.head_dim
        original_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        own_heads = layer.num_kv_heads if layer.kv_proj == "merged_heads" else original_kv_heads
        source = spec.layers[layer.kv_from] if layer.kv_from is not None else layer
        # Heads of the K/V this layer attends over (its own, or its producer's); for probs_from, of its values.
        self.num_kv_heads = source.num_kv_heads if source.kv_proj == "merged_heads" else original_kv_heads

        if layer.probs_from is None:
            self.q_proj = nn.Linear(hidden, heads * dim, bias=bias)
        self.cache_representation.build(self, layer, hidden, heads, own_heads, dim, bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=config.attention_output_bias)

    @staticmethod
    def default_rope_index(num_kv_heads: int, rope_dims: int) -> torch.Tensor:
        """Before surgery picks them: the rope_dims/2 highest-frequency pairs stay rotary in every head."""
        return torch.arange(rope_dims // 2).expand(num_kv_heads, -1).clone()

    # ---- attention over a producer's cache (own or shared) -------------------------------------------
    def attend(self, shared: SharedKV, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: SlotPlan,
               need_probs: bool, dropout: float):
        """query [B, H, T, D] unrotated -> out [B, K, G, T, D], probs [B, K, G, T, S] | None. Public: PyramidKV
        scores the prompt's slots through it (models/pyramid.py). A shared-rotary producer's query is
        [B, H, T, D + Dr]: q_proj's D dims, then q_rope's Dr (both unrotated).

        Several new tokens (training, prefill): latent caches are up-projected to whole K / V once per step
        (`SharedKV.dense_kv`) and every representation attends through `kv_attention` (SDPA, flash when the
        mask is causal). One new token (decode): the latent functions, whose absorbed forms never rebuild K / V
        and where the fused kernels plug in.
        """
        batch, heads, length, dim = query.shape
        kv_heads = shared.producer.num_kv_heads
        query = query.view(batch, kv_heads, heads // kv_heads, length, dim)  # head h reads kv head h // G
        use_sdpa = self.config._attn_implementation == "sdpa"
        return CACHE_REPRESENTATIONS[shared.representation].attend(shared, query, cos, sin, plan, self.scaling,
                                                                   need_probs, dropout, use_sdpa)

    def _as_cached(self, entries: dict[str, torch.Tensor], plan: SlotPlan, storage: LayerStorage | None):
        """The new tokens' cache entries as attention reads them: with a cache, every attendable slot (the storage
        writes the new ones); without one (training, scoring), the new entries, rounded as a low-bit cache would
        hold them."""
        if storage is not None:
            return storage.update(plan, entries)
        if self.layer_spec.cache_bits is None:
            return entries
        bits = self.layer_spec.cache_bits
        return {name: fake_quantize(value, self.cached_slot_dims[name], bits) for name, value in entries.items()}

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, T, E]
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin [B, T, D]
        plan: SlotPlan,
        storage: LayerStorage | None,
        handoff: LayerHandoff,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        cos, sin = position_embeddings
        layer = self.layer_spec
        dropout = self.attention_dropout if self.training else 0.0
        need_probs = self.shares_probs or output_attentions

        if layer.probs_from is not None:
            probs = handoff.probs[layer.probs_from]  # [B, H, T, S]
            values = self._as_cached(self.cache_representation.project(self, hidden_states, cos, sin), plan, storage)
            kv_heads = self.num_kv_heads
            grouped = probs.view(batch, kv_heads, self.num_heads // kv_heads, length, -1)
            out, _ = self.cache_representation.attend_probs(self, grouped, values, dropout)
            probs = None
        else:
            query = self.cache_representation.query(self, hidden_states)
            if layer.kv_from is not None:
                shared = handoff.kv[layer.kv_from]
            else:
                entries = self._as_cached(self.cache_representation.project(self, hidden_states, cos, sin), plan,
                                          storage)
                shared = SharedKV(self.cache_representation.name, entries, self)
                if self.shares_kv:
                    handoff.kv[self.layer_idx] = shared
            out, probs = self.attend(shared, query, cos, sin, plan, need_probs, dropout)
            if storage is not None and storage.pyramid is not None and storage.pyramid.wants(self.layer_idx):
                # PyramidKV scores the prompt's slots by this layer's attention from its last queries.
                storage.pyramid.observe_layer(self, query, cos, sin, plan, shared)
            if probs is not None:
                probs = probs.reshape(batch, self.num_heads, length, -1)  # [B, H, T, S]
                if self.shares_probs:
                    handoff.probs[self.layer_idx] = probs

        out = out.reshape(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), (probs if output_attentions else None)


# ================================================================================================
# Decoder
# ================================================================================================


def layers_compile_settings(layers: list[nn.Module]) -> dict:
    """Prepares decoder layers of different ranks to share one compiled graph (compiled one layer at a time in
    training, or a compiled decode step) and returns the Dynamo settings that must hold while they are traced.

    Surgery gives layers their own ranks: with parameter shapes static, each rank would be a graph of its own, past
    Dynamo's 8 per function, after which it runs the rest uncompiled without saying so (SmolLM2's 25% model has ~8
    rank pairs). So parameters may be dynamic (nn.Linear weights are governed by the second flag, other parameters
    by the first), the dims that differ between layers are marked dynamic before the first trace (otherwise the
    first layer compiles with static sizes and the second rank recompiles symbolically), and the recompile limit
    covers one graph per layer and mode (train, eval) for the layer kinds that remain."""
    mark_varying_dims_dynamic(layers)
    return dict(force_parameter_static_shapes=False, force_nn_module_property_static_shapes=False,
                recompile_limit=max(torch._dynamo.config.recompile_limit, 2 * len(layers) + 8))


def mark_varying_dims_dynamic(layers: list[nn.Module]) -> None:
    """Marks each parameter dimension whose size differs between layers (a latent rank) as dynamic before the first
    trace. maybe_mark_dynamic: a dimension the graph needs static stays static."""
    sizes: dict[str, set[tuple[int, ...]]] = {}
    for layer in layers:
        for name, p in layer.named_parameters():
            sizes.setdefault(name, set()).add(tuple(p.shape))
    for layer in layers:
        for name, p in layer.named_parameters():
            shapes = sizes[name]
            for dim in range(p.ndim):
                if len({shape[dim] for shape in shapes if len(shape) == p.ndim}) > 1:
                    torch._dynamo.maybe_mark_dynamic(p, dim)


class KVForgeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: KVForgeConfig, layer_idx: int, spec=None):
        super().__init__()
        self.self_attn = KVForgeAttention(config, layer_idx, spec)
        self.mlp = KVForgeMLP(config)
        self.input_layernorm = KVForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KVForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, plan, storage, handoff, output_attentions=False):
        residual = hidden_states
        attn_out, probs = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings=position_embeddings, plan=plan,
            storage=storage, handoff=handoff, output_attentions=output_attentions)
        hidden_states = residual + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


class KVForgePreTrainedModel(PreTrainedModel):
    config_class = KVForgeConfig
    config: KVForgeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KVForgeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the source text; here every attention call reads
        # config._attn_implementation ("eager" or "sdpa") at run time, so switching is safe.
        return True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, KVForgeAttention) and hasattr(module, "rope_index"):
            default = module.default_rope_index(module.rope_index.shape[0], 2 * module.rope_index.shape[1])
            default = default.to(module.rope_index.device)
            if hf_init is not None:
                hf_init.copy_(module.rope_index, default)
            else:
                with torch.no_grad():
                    module.rope_index.copy_(default)


class KVForgeModel(KVForgePreTrainedModel):
    def __init__(self, config: KVForgeConfig):
        super().__init__(config)
        spec = config.compression_spec
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [KVForgeDecoderLayer(config, i, spec) for i in range(config.num_hidden_layers)])
        self.norm = KVForgeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = KVForgeRotaryEmbedding(config)
        self.layer_layouts = [layer.layout for layer in spec.layers]  # (window, sinks) per layer
        # The layouts whose layers rotate keys at attention time (their own pre-RoPE latents or, kv_from, their
        # producer's): only their plans need the keys' RoPE tables.
        self.key_rotary_layouts = {
            layer.layout for layer in spec.layers
            if (spec.layers[layer.kv_from] if layer.kv_from is not None else layer).representation == "pre_rope_latent"}
        self.gradient_checkpointing = False
        # KVForgeCache(compile_step=True)'s compiled decode step: None until a first call builds and checks it, False
        # once compiling failed (see _decode_step).
        self._compiled_decode_step: Callable | bool | None = None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVForgeCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: KVForgeCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """attention_mask: 2D [B, past + T], 1 = real token, 0 = padding (left padding for batched generation).

        Raises ValueError for a missing/duplicated input or a mask of the wrong shape, TypeError for a cache
        that is not a KVForgeCache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; setting use_cache=False")
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape

        cache = _one_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, KVForgeCache):
            raise TypeError(
                f"KVForge layers need a KVForgeCache, got {type(cache).__name__}; pass none and one is "
                f"created (generate() does this), or pass KVForgeCache(model.config)"
            )
        if use_cache and cache is None:
            cache = KVForgeCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        device = inputs_embeds.device
        no_padding = attention_mask is None  # known without asking the device (a sync would split a compiled graph)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, past_length + length):
            raise ValueError(
                f"attention_mask must be 2D [batch, past + new] = [{batch}, {past_length + length}] (1 = token, "
                f"0 = padding), got shape {tuple(attention_mask.shape)}"
            )
        if not no_padding and length > 1:
            # One sync, for several new tokens only (a prefill): without padding the first plans share one mask
            # row, not [B, T, S]. A one-token decode step never syncs here (static cache, CUDA graphs).
            no_padding = bool(attention_mask.all())
        new_valid = attention_mask[:, past_length:].bool()  # [B, T]
        if position_ids is None:  # as Llama: positions count columns, padding included
            position_ids = torch.arange(past_length, past_length + length, device=device)[None].expand(batch, -1)
        position_ids = position_ids.expand(batch, -1)

        all_hidden, all_attentions = [], []
        if (cache is not None and cache.static and cache.is_initialized and length == 1 and not output_attentions
                and not output_hidden_states):
            # One token into a static cache: a step with no host sync and fixed shapes (a CUDA graph on a GPU).
            hidden_states = cache.static_decode(self._decode_step(cache), inputs_embeds, position_ids, new_valid)
        else:
            hidden_states, plans = self._run_layers(inputs_embeds, position_ids, new_valid, cache, no_padding,
                                                    output_attentions, all_hidden if output_hidden_states else None,
                                                    all_attentions)
            if cache is not None:
                cache.commit(plans, new_valid, position_ids)
                if cache.pyramid is not None:
                    cache.pyramid.finish_step(cache)  # commits the compacted groups; compacts after the prefill

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_ARGUMENT: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _run_layers(self, inputs_embeds, position_ids, new_valid, cache, no_padding, output_attentions,
                    all_hidden: list | None = None, all_attentions: list | None = None):
        """The decoder layers over T new tokens (slot plans per layout, then every layer): hidden states [B, T, E]
        before the final norm, and the plans (for `cache.commit`). Collects each layer's input hidden states and
        its attentions into the lists given (None: not collected)."""
        batch = inputs_embeds.shape[0]
        if cache is not None:
            query_index = cache.query_index(new_valid)
        else:
            query_index = _token_index(new_valid, new_valid.new_zeros(batch, dtype=torch.long))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)  # cos, sin [B, T, D]

        def rotary(positions):  # inv_freq as the call above left it (dynamic RoPE types update it there)
            return KeyRotary(positions, self.rotary_emb.inv_freq, self.rotary_emb.attention_scaling,
                             inputs_embeds.dtype)

        plans: dict[tuple, SlotPlan] = {}
        for layout in dict.fromkeys(self.layer_layouts):
            source = cache.layouts[layout] if cache is not None else SlotLayout(*layout)
            plans[layout] = source.plan(query_index, position_ids, writes=cache is not None, no_padding=no_padding)
            plans[layout].rotary = rotary
            # What the first layer would otherwise build lazily for the rest (the keys' RoPE tables; without a cache
            # the SDPA mask), built here, so that every layer meets the same plan: layers compiled one at a time
            # (training.compile_scope=layers, a compiled decode step) then share one graph instead of giving the
            # first its own.
            if layout in self.key_rotary_layouts:
                plans[layout].key_rotary().tables()
            if cache is None:
                plans[layout].sdpa_mask()

        handoff = LayerHandoff()
        hidden_states = inputs_embeds
        pyramid = cache.pyramid if cache is not None else None
        for idx, decoder_layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            plan = plans[self.layer_layouts[idx]]
            if pyramid is not None:  # after the prefill, a compacted group attends over its kept slots
                plan = pyramid.plan_for(idx, plan, cache.layers[idx])
            hidden_states, probs = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                plan=plan,
                storage=cache.layers[idx] if cache is not None else None,
                handoff=handoff,
                output_attentions=output_attentions,
            )
            if output_attentions and all_attentions is not None:
                all_attentions.append(probs)
        return hidden_states, plans

    def _static_decode_step(self, inputs_embeds, position_ids, new_valid, cache):
        """One token per row into a static cache: device work only (KVForgeCache.static_decode runs it eagerly or
        as a CUDA graph, then moves the cache's counters)."""
        return self._run_layers(inputs_embeds, position_ids, new_valid, cache, False, False)[0]

    def _decode_step(self, cache: KVForgeCache) -> Callable:
        """The static decode step `cache` asks for: `_static_decode_step`, or with `cache.compile_step` that step
        through torch.compile, compiled once per model (Dynamo recompiles by itself for new shapes). The first
        compiled call is checked against the uncompiled step on the same inputs (both write the same token into the
        same slots, so running the two is harmless); if compiling fails or the two disagree beyond what fused
        rounding explains, one warning, and this model decodes uncompiled from then on."""
        return self._compiled_step if cache.compile_step else self._static_decode_step

    def _compiled_step(self, inputs_embeds, position_ids, new_valid, cache):
        # Resolved per call: KVForgeCache._graph_step runs one step object twice, a warm-up (where the first call
        # compiles and checks, reading the device) and the capture (where nothing may read the device).
        if self._compiled_decode_step is None:
            return self._compile_checked_step(inputs_embeds, position_ids, new_valid, cache)
        step = self._compiled_decode_step or self._static_decode_step
        return step(inputs_embeds, position_ids, new_valid, cache)

    def _compile_checked_step(self, inputs_embeds, position_ids, new_valid, cache):
        # The settings hold while the step runs: Dynamo reads them when it traces, which a new shape can make it do
        # again at any later call.
        settings = torch._dynamo.config.patch(**layers_compile_settings(list(self.layers)))
        compiled = settings(torch.compile(self._static_decode_step))
        expected = self._static_decode_step(inputs_embeds, position_ids, new_valid, cache)
        try:
            got = compiled(inputs_embeds, position_ids, new_valid, cache)
        except Exception as error:  # any compiler failure leaves the uncompiled step, which works
            self._compiled_decode_step = False
            logger.warning("compiling the static decode step failed (%s: %s); decoding uncompiled",
                           type(error).__name__, error)
            return expected
        # Relative to the hidden states' size: a fused kernel rounds once where eager ops round each time (bf16:
        # ~1e-3 per layer); a wrong slot, a stale cache or a dropped term moves them by O(1).
        difference = ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
        tolerance = COMPILED_STEP_TOLERANCE.get(expected.dtype, 5e-2)
        if not difference <= tolerance:
            self._compiled_decode_step = False
            logger.warning("the compiled static decode step disagrees with the uncompiled one (relative difference "
                           "%.2e > %.0e); decoding uncompiled", difference, tolerance)
            return expected
        self._compiled_decode_step = compiled
        return got


class KVForgeForCausalLM(KVForgePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def static_cache(self, max_cache_len: int, cuda_graphs: bool = True, compile_step: bool = False) -> KVForgeCache:
        """A preallocated cache for `generate(..., cache=model.static_cache(prompt + new tokens))`: decode steps
        without host syncs, one CUDA graph on a GPU (KVForgeCache(static=True)); compile_step=True compiles the
        step's PyTorch ops first."""
        return KVForgeCache(self.config, max_cache_len=max_cache_len, static=True, cuda_graphs=cuda_graphs,
                            compile_step=compile_step)

    def __init__(self, config: KVForgeConfig):
        super().__init__(config)
        self.model = KVForgeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVForgeCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: KVForgeCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_ARGUMENT: getattr(outputs, CACHE_ARGUMENT)},
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode=None,
                                      batch_size=None, max_cache_length=None, *args, **kwargs):
        """generate() gets exactly one KVForgeCache, sized from the generation's max length, under the name this
        transformers passes to forward() (transformers would make a DynamicCache, which cannot hold compressed
        layers)."""
        caches = {name: model_kwargs.pop(name) for name in ("cache", "past_key_values")
                  if model_kwargs.get(name) is not None}
        if caches:
            cache = _one_cache(caches.get("cache"), caches.get("past_key_values"))
            if not isinstance(cache, KVForgeCache):
                raise TypeError(
                    f"{CACHE_ARGUMENT} must be a KVForgeCache, got {type(cache).__name__}; omit it and generate() "
                    f"creates one"
                )
            cache._is_user_defined = True
            model_kwargs[CACHE_ARGUMENT] = cache
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation == "static":
            # transformers' convention for a preallocated cache with a compiled decode step (disable_compile: not
            # compiled), met by KVForgeCache(static=True): each layer's own representation, preallocated.
            model_kwargs[CACHE_ARGUMENT] = KVForgeCache(
                self.config, max_cache_len=max_cache_length, static=True,
                compile_step=not getattr(generation_config, "disable_compile", False))
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: KVForge models "
                f"generate with their own KVForgeCache, dynamic (the default) or static (\"static\")"
            )
        model_kwargs[CACHE_ARGUMENT] = KVForgeCache(self.config, max_cache_len=max_cache_length)


def generated_cache(outputs) -> Cache | None:
    """The cache a forward() or generate(return_dict_in_generate=True) returned, of any model, under the name
    this transformers gives it (see CACHE_ARGUMENT)."""
    return getattr(outputs, CACHE_ARGUMENT, None)


# Largest logit by which the uncached forward may prefer another token over the one cached decoding chose: float
# rounding only (cached decoding reads the same values in another order). A cache that drops or re-creates
# state shifts logits by whole units.
DECODING_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.25, torch.float16: 0.05}
# A low-bit cache rounds each cached value to a level, slot by slot. The cached and the uncached forward compute a
# slot's value in GEMMs of different shapes, whose sums can differ in the last bit, so a value on a level boundary
# may round one level apart: one 8-bit level moves a logit by ~1e-2 (0.0077 in session 14's CPU main job, whose
# model gave a margin of exactly 0 in float64), a 4-bit level ~18x that. Still far below the whole units by which a
# cache that drops or re-creates state shifts logits. float64 sums agree, so it keeps its own tolerance.
LOW_BIT_DECODING_TOLERANCE = {8: 0.05, 4: 0.25}


def decoding_tolerance(config, dtype: torch.dtype) -> float:
    """The largest margin check_cached_decoding allows for a model of `config` run in `dtype`."""
    tolerance = DECODING_TOLERANCE.get(dtype, 0.25)
    bits = [layer.cache_bits for layer in config.compression_spec.layers if layer.cache_bits is not None]
    if bits and dtype != torch.float64:
        tolerance = max(tolerance, LOW_BIT_DECODING_TOLERANCE[min(bits)])
    return tolerance


@torch.no_grad()
def check_cached_decoding(model: KVForgeForCausalLM, new_tokens: int = 32, seed: int = 0) -> dict:
    """Greedy generate() with the cache must choose the tokens the uncached model prefers: a batch of two random
    prompts of different lengths (left padding), `new_tokens` steps, then one uncached forward over the whole
    result. Also checks that generate() used one KVForgeCache whose bytes equal the spec's arithmetic.

    Ships with every export so a model can be checked in the environment that serves it (e.g. after a transformers
    upgrade). PyramidKV defaults are switched off for the comparison: a compacted cache differs by design.

    Returns {"steps", "rows", "max_margin", "cache_bytes", "tokens"}; raises RuntimeError naming the row and step
    where cached decoding went wrong.
    """
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    lengths = (13, 6)
    prompt = torch.randint(3, config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(prompt)
    for row, length in enumerate(lengths):
        mask[row, max(lengths) - length:] = 1
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    prompt = prompt.masked_fill(mask == 0, pad).to(device)
    mask = mask.to(device)
    # Sized as generate() sizes its own (the last new token is never fed back), so bytes equal the arithmetic.
    cache = KVForgeCache(config, max_cache_len=max(lengths) + new_tokens - 1, pyramid=False)
    try:
        out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=pad, **{CACHE_ARGUMENT: cache})
    except Exception as error:  # a cache that reaches forward() wrongly often fails here first
        raise RuntimeError(f"cached greedy generate() failed: {type(error).__name__}: {error}") from error
    if generated_cache(out) is not cache:
        raise RuntimeError(f"generate() decoded with a {type(generated_cache(out)).__name__} instead of the "
                           f"KVForgeCache it was given: this transformers passes the cache under a name the model "
                           f"does not read")
    sequences = out.sequences
    full_mask = torch.cat([mask, mask.new_ones(len(lengths), new_tokens)], dim=1)
    # At generate()'s positions (counting real tokens): a low-bit cache of rotated keys rounds them after RoPE, so
    # the logits depend on absolute positions, not only on relative ones as they do in the model's own dtype.
    positions = (full_mask.long().cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    logits = model(input_ids=sequences, attention_mask=full_mask, position_ids=positions,
                   use_cache=False).logits.float()
    logits = logits[:, max(lengths) - 1:-1]  # the positions that chose each new token
    chosen = sequences[:, max(lengths):]
    margin = logits.max(-1).values - logits.gather(-1, chosen[..., None])[..., 0]  # [rows, new_tokens], >= 0
    tolerance = decoding_tolerance(config, dtype)
    bad = (margin > tolerance).nonzero()
    if len(bad):
        row, step = bad[0].tolist()
        raise RuntimeError(
            f"cached decoding diverged from the uncached model at row {row}, step {step}: the cache chose token "
            f"{chosen[row, step].item()} but the uncached forward prefers {logits[row, step].argmax().item()} by "
            f"{margin[row, step].item():.4f} logits (tolerance {tolerance} in {str(dtype).removeprefix('torch.')})")
    held = cache.get_seq_length()
    expected = config.kv_cache_bytes(held, dtype, batch_size=len(lengths))
    if cache.cache_bytes() != expected:
        raise RuntimeError(f"the cache generate() filled holds {cache.cache_bytes()} bytes after {held} positions "
                           f"but the spec's arithmetic says {expected}")
    return {"steps": new_tokens, "rows": len(lengths), "max_margin": margin.max().item(),
            "cache_bytes": cache.cache_bytes(), "tokens": held}


__all__ = [
    "CACHE_ARGUMENT",
    "check_cached_decoding",
    "generated_cache",
    "KVForgeCache",
    "KVForgeForCausalLM",
    "KVForgeModel",
    "KVForgePreTrainedModel",
    "KVForgeAttention",
    "attention_function",
]

KVForgeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
if __name__.startswith("kvforge."):
    # Inside the package AutoModelForCausalLM resolves "kvforge" without trust_remote_code; an exported copy
    # loaded as remote code leaves the global registry alone.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.register(KVForgeConfig, KVForgeForCausalLM, exist_ok=True)
