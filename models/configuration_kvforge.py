"""KVForgeConfig: a Llama-family causal LM config plus the per-layer KV-compression spec.

This file ships beside exported weights and is loaded by plain `transformers` (trust_remote_code), so it
imports only torch, transformers and its sibling pyramid.py.

The spec (docs/ARCHITECTURE.md) is one record per layer; methods compose because they are fields of the
same record:

    LayerSpec
      attention:  "global" | "window"    window: W (the token itself and the W-1 previous), sinks: first tokens
                                          that stay visible (StreamingLLM)
      kv_from:    None | j < i            no K/V projections; reads layer j's cached K/V (j must be a producer)
      kv_proj:    "dense"                 k_proj / v_proj as in the original
                | "merged_heads"          num_kv_heads heads (<= original, divides num_attention_heads)
                | "low_rank"              rope="pre_rope_latent": k_rank, v_rank   (cache: the two latents)
                                          rope="partial":         kv_rank, rope_dims (cache: joint latent +
                                                                  rope_dims rotary key dims per kv head)
                                            + rope_shared=True    one rotary key shared by all heads (DeepSeek
                                                                  MLA; cache: joint latent + rope_dims
                                                                  rotary key dims, once)
      probs_from: None | j < i            reuses layer j's attention probabilities: no q, no k; own V only
      cache_bits: None | 4 | 8            None: cached in the model's dtype; 8: each cached tensor held as int8,
                                          4: as 4-bit integers, two per byte (so its last dim, e.g. a latent
                                          rank, must be even); one absmax scale per token (in the model's dtype),
                                          rounded the same way in training (straight-through) and in the cache

Sharing never chains: kv_from / probs_from must name the layer that computes the shared thing itself
(its "producer"), so every consumer reads a tensor computed in the same forward step, and a reader of the
config sees the producer directly.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.utils import logging

# PyramidKV's settings are defined (and validated) once, beside the method; pyramid.py imports only torch
# and ships with this file.
from .pyramid import PyramidError, PyramidSettings

logger = logging.get_logger(__name__)

ATTENTION_TYPES = ("global", "window")
KV_PROJ_TYPES = ("dense", "low_rank", "merged_heads")
ROPE_LAYOUTS = ("pre_rope_latent", "partial")
CACHE_BITS = (4, 8)  # besides None (the model's dtype)


def cache_rank_step(cache_bits: int | None) -> int:
    """What a latent rank cached in `cache_bits` must be a multiple of: 2 for 4 bits (two values per byte), else 1."""
    return 2 if cache_bits == 4 else 1


# Triton vectorises a kernel's loads only where a row stride is a multiple of 16 bytes: on an H200, int8 latents of
# odd ranks (33) decoded at 1,205 tok/s where ranks rounded to 16 in the same bytes gave 2,231.
CACHE_ROW_ALIGNMENT_BYTES = 16


def aligned_rank_step(cache_bits: int | None, dtype: torch.dtype | str) -> int:
    """The rank step that keeps cached latent rows on 16-byte boundaries: 8 in bf16/fp16, 4 in fp32, 16 in int8,
    32 in 4 bits. A speed choice for rank allocation, not a format rule (the spec requires cache_rank_step only)."""
    bits = cache_bits if cache_bits is not None else 8 * dtype_num_bytes(dtype)
    return max(cache_rank_step(cache_bits), 8 * CACHE_ROW_ALIGNMENT_BYTES // bits)


SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2")


class CompressionSpecError(ValueError):
    """A compression spec that cannot describe a model; the message names the layer, the field and the fix."""


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: dict, allowed, where: str) -> None:
    if not isinstance(data, dict):
        raise CompressionSpecError(f"{where} must be a mapping, got {data!r} ({type(data).__name__})")
    for key in data:
        if key not in allowed:
            raise CompressionSpecError(
                f"{where}: unknown key {key!r}{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"
            )


def _check_int(value, where: str, *, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> None:
    # bool is an int subclass; `window: true` in a YAML file is a mistake, not a window of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise CompressionSpecError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (
            f"{minimum} <= value <= {maximum}" if minimum is not None and maximum is not None
            else f"value >= {minimum}" if minimum is not None else f"value <= {maximum}"
        )
        raise CompressionSpecError(f"{where}={value} is out of range: allowed {bounds}{hint}")


def _check_choice(value, choices, where: str) -> None:
    if value not in choices:
        raise CompressionSpecError(
            f"{where}={value!r} is not one of {', '.join(map(repr, choices))}{_did_you_mean(value, choices)}"
        )


def dtype_num_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype given as a dtype or its name ("bfloat16", "torch.float16")."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype name such as 'bfloat16' or 'float32'")
        dtype = resolved
    return torch.empty((), dtype=dtype).element_size()


def head_dim_of(config) -> int:
    """A model config's attention head size: its `head_dim` where set, else hidden_size / attention heads
    (Llama, Mistral and Qwen2 configs may leave head_dim unset)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class CachedTensor:
    """One tensor a layer caches: its slot (token) axis and the elements one slot takes, from the layer's spec, the
    kv heads of its cache and head_dim. The modeling file allocates exactly these (its CacheRepresentation classes
    write them); the spec's byte arithmetic sums them."""

    slot_dim: int  # 1: [B, C, R] (a latent, no head axis); 2: [B, heads, C, d]
    elements: Callable[["LayerSpec", int, int], int]


def _per_head(layer: "LayerSpec", heads: int, head_dim: int) -> int:
    return heads * head_dim


# What each cache representation (LayerSpec.representation) holds per slot. C = slot capacity, K = kv heads.
CACHED_TENSORS: dict[str, dict[str, CachedTensor]] = {
    "kv": {"key": CachedTensor(2, _per_head), "value": CachedTensor(2, _per_head)},  # [B, K, C, D], keys rotated
    "pre_rope_latent": {"k_latent": CachedTensor(1, lambda layer, heads, dim: layer.k_rank),  # [B, C, Rk]
                        "v_latent": CachedTensor(1, lambda layer, heads, dim: layer.v_rank)},  # [B, C, Rv]
    "partial": {"kv_latent": CachedTensor(1, lambda layer, heads, dim: layer.kv_rank),  # [B, C, R]
                "k_rope": CachedTensor(2, lambda layer, heads, dim: heads * layer.rope_dims)},  # [B, K, C, Dr]
    "partial_shared": {"kv_latent": CachedTensor(1, lambda layer, heads, dim: layer.kv_rank),  # [B, C, R]
                       "k_rope": CachedTensor(2, lambda layer, heads, dim: layer.rope_dims)},  # [B, 1, C, Dr]
    "v": {"value": CachedTensor(2, _per_head)},  # [B, K, C, D]
    "v_latent": {"v_latent": CachedTensor(1, lambda layer, heads, dim: layer.v_rank)},  # [B, C, Rv]
    "none": {},  # kv_from consumer: reads its producer's cache
}


@dataclass
class LayerSpec:
    """How one decoder layer attends and what it caches. See the module docstring for the fields."""

    attention: str = "global"
    window: int | None = None
    sinks: int = 0
    kv_from: int | None = None
    kv_proj: str = "dense"
    k_rank: int | None = None
    v_rank: int | None = None
    kv_rank: int | None = None
    rope: str | None = None
    rope_dims: int | None = None
    rope_shared: bool = False
    num_kv_heads: int | None = None
    probs_from: int | None = None
    cache_bits: int | None = None

    # ---- roles -------------------------------------------------------------------------------------
    @property
    def is_window(self) -> bool:
        return self.attention == "window"

    @property
    def layout(self) -> tuple[int | None, int]:
        """(window, sinks): layers with equal layouts hold the same tokens in the same cache slots."""
        return (self.window, self.sinks) if self.is_window else (None, 0)

    @property
    def owns_kv(self) -> bool:
        """Computes (and caches) its own keys and values: neither a kv_from nor a probs_from consumer."""
        return self.kv_from is None and self.probs_from is None

    @property
    def representation(self) -> str:
        """What this layer's cache holds per token: 'kv' (K and V per kv head), 'pre_rope_latent' (two
        latents), 'partial' (joint latent + rotary key dims per kv head), 'partial_shared' (joint latent + one
        rotary key for all heads), 'none' (kv_from consumer). A probs_from consumer holds values only: 'v'
        (per kv head) or 'v_latent'."""
        if self.kv_from is not None:
            return "none"
        if self.probs_from is not None:
            return "v_latent" if self.kv_proj == "low_rank" else "v"
        if self.kv_proj == "low_rank":
            return "partial_shared" if self.rope_shared else self.rope
        return "kv"

    @property
    def cached_tensors(self) -> dict[str, "CachedTensor"]:
        """name -> CachedTensor for each tensor this layer's cache holds (none for a kv_from consumer)."""
        return CACHED_TENSORS[self.representation]

    # ---- (de)serialization -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, layer_idx: int | None = None) -> "LayerSpec":
        where = f"compression.layers[{layer_idx}]" if layer_idx is not None else "layer spec"
        allowed = [f.name for f in fields(cls)]
        _check_keys(data, allowed, where)
        return cls(**data)

    def to_dict(self) -> dict:
        """Only what differs from the dense global default, so config.json reads like the spec."""
        default = LayerSpec()
        out = {"attention": self.attention, "kv_proj": self.kv_proj}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value != getattr(default, f.name):
                out[f.name] = value
        return out

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Checks this layer alone (cross-layer references are checked by CompressionSpec.validate)."""
        at = f"compression.layers[{layer_idx}]"
        _check_choice(self.attention, ATTENTION_TYPES, f"{at}.attention")
        _check_choice(self.kv_proj, KV_PROJ_TYPES, f"{at}.kv_proj")
        _check_int(self.sinks, f"{at}.sinks", minimum=0)
        if self.is_window:
            if self.window is None:
                raise CompressionSpecError(
                    f"{at}.window is missing: attention='window' needs window >= 1 (the token itself and the "
                    f"window-1 tokens before it)"
                )
            _check_int(self.window, f"{at}.window", minimum=1,
                       hint=" (a window layer sees the token itself and the window-1 tokens before it)")
        else:
            if self.window is not None:
                raise CompressionSpecError(
                    f"{at}.window={self.window!r} is set but attention='global'; "
                    f"set attention='window' or remove window"
                )
            if self.sinks:
                raise CompressionSpecError(
                    f"{at}.sinks={self.sinks!r} is set but attention='global' sees every token anyway; "
                    f"set attention='window' or remove sinks"
                )

        if self.kv_from is not None and self.probs_from is not None:
            raise CompressionSpecError(
                f"{at} sets both kv_from={self.kv_from} and probs_from={self.probs_from}; a layer shares either "
                f"another layer's K/V (kv_from) or its attention probabilities (probs_from), not both"
            )
        for name in ("kv_from", "probs_from"):
            source = getattr(self, name)
            if source is None:
                continue
            _check_int(source, f"{at}.{name}")
            if source >= layer_idx or source < 0:
                raise CompressionSpecError(
                    f"{at}.{name}={source} must name an earlier layer: allowed 0 <= {name} < {layer_idx}"
                    + (" (a layer cannot read itself)" if source == layer_idx else "")
                )

        if self.cache_bits is not None:
            if isinstance(self.cache_bits, bool) or self.cache_bits not in CACHE_BITS:
                raise CompressionSpecError(
                    f"{at}.cache_bits={self.cache_bits!r} is not supported: allowed null (cached in the model's dtype) "
                    f"or one of {', '.join(map(str, CACHE_BITS))} (integer values with one scale per token and tensor)")
            if self.kv_from is not None:
                raise CompressionSpecError(
                    f"{at}.cache_bits={self.cache_bits!r} has no effect: a kv_from layer caches nothing and reads "
                    f"layer {self.kv_from}'s cache as it is stored; set cache_bits on layer {self.kv_from}")

        # Fields each kv_proj may use; anything else set is a mistake the user should hear about.
        if self.kv_from is not None:
            if self.kv_proj != "dense":
                raise CompressionSpecError(
                    f"{at}.kv_proj={self.kv_proj!r} has no effect: a kv_from layer has no K/V projections and reads "
                    f"layer {self.kv_from}'s cache as it is; remove kv_proj (or set it on layer {self.kv_from})"
                )
            used: set[str] = set()
        elif self.kv_proj == "dense":
            used = set()
        elif self.kv_proj == "merged_heads":
            used = {"num_kv_heads"}
            if self.num_kv_heads is None:
                raise CompressionSpecError(f"{at}.num_kv_heads is missing: kv_proj='merged_heads' needs it")
            _check_int(self.num_kv_heads, f"{at}.num_kv_heads", minimum=1, maximum=num_kv_heads,
                       hint=f" (merging cannot add heads to the original {num_kv_heads})")
            if num_heads % self.num_kv_heads:
                divisors = [d for d in range(1, num_kv_heads + 1) if num_heads % d == 0]
                raise CompressionSpecError(
                    f"{at}.num_kv_heads={self.num_kv_heads} does not divide num_attention_heads={num_heads}; "
                    f"allowed: {divisors}"
                )
        elif self.probs_from is not None:  # low_rank values only
            used = {"v_rank"}
            if self.v_rank is None:
                raise CompressionSpecError(
                    f"{at}.v_rank is missing: a probs_from layer with kv_proj='low_rank' compresses its values only"
                )
            _check_int(self.v_rank, f"{at}.v_rank", minimum=1, maximum=num_kv_heads * head_dim,
                       hint=f" (values have num_kv_heads * head_dim = {num_kv_heads * head_dim} dims)")
            if self.rope is not None:
                raise CompressionSpecError(
                    f"{at}.rope={self.rope!r} has no effect: a probs_from layer has no keys; remove rope"
                )
        else:  # low_rank producer
            if self.rope is None:
                raise CompressionSpecError(
                    f"{at}.rope is missing: kv_proj='low_rank' needs rope='pre_rope_latent' (with k_rank, v_rank) "
                    f"or rope='partial' (with kv_rank, rope_dims)"
                )
            _check_choice(self.rope, ROPE_LAYOUTS, f"{at}.rope")
            kv_dims = num_kv_heads * head_dim
            if self.rope == "pre_rope_latent":
                used = {"k_rank", "v_rank", "rope"}
                for name in ("k_rank", "v_rank"):
                    if getattr(self, name) is None:
                        raise CompressionSpecError(
                            f"{at}.{name} is missing: rope='pre_rope_latent' needs k_rank and v_rank")
                    _check_int(getattr(self, name), f"{at}.{name}", minimum=1, maximum=kv_dims,
                               hint=f" (it compresses num_kv_heads * head_dim = {kv_dims} dims)")
            else:
                used = {"kv_rank", "rope", "rope_dims"}
                if self.rope_dims is None:
                    raise CompressionSpecError(f"{at}.rope_dims is missing: rope='partial' needs rope_dims")
                _check_int(self.rope_dims, f"{at}.rope_dims", minimum=2, maximum=head_dim,
                           hint=" (rotary dims per kv head)")
                if self.rope_dims % 2:
                    raise CompressionSpecError(
                        f"{at}.rope_dims={self.rope_dims} must be even: rotary dims come in (i, i + head_dim/2) pairs"
                    )
                if self.kv_rank is None:
                    raise CompressionSpecError(f"{at}.kv_rank is missing: rope='partial' needs kv_rank")
                if not isinstance(self.rope_shared, bool):
                    raise CompressionSpecError(
                        f"{at}.rope_shared={self.rope_shared!r} must be true (one rotary key shared by every head, "
                        f"DeepSeek MLA) or false (rope_dims rotary dims per kv head)")
                if self.rope_shared:
                    used.add("rope_shared")
                    # Every head's whole key (its residual in the shared rotary dims included) goes through the
                    # latent; the shared rotary key is cached on its own.
                    joint = 2 * kv_dims
                    hint = f" (the joint latent compresses {kv_dims} key dims + {kv_dims} value dims = {joint})"
                else:
                    joint = num_kv_heads * (head_dim - self.rope_dims) + kv_dims
                    hint = (f" (the joint latent compresses {num_kv_heads} x ({head_dim} - {self.rope_dims}) "
                            f"non-rotary key dims + {kv_dims} value dims = {joint})")
                _check_int(self.kv_rank, f"{at}.kv_rank", minimum=1, maximum=joint, hint=hint)
        if self.cache_bits == 4:  # two values share a byte along each cached tensor's last dim
            odd = [f"{name}={getattr(self, name)}" for name in ("k_rank", "v_rank", "kv_rank")
                   if name in used and getattr(self, name) % 2]
            if head_dim % 2:
                odd.append(f"head_dim={head_dim}")
            if odd:
                raise CompressionSpecError(
                    f"{at}.cache_bits=4 packs two values per byte, so every cached dim must be even; got "
                    f"{', '.join(odd)}")
        for name in ("k_rank", "v_rank", "kv_rank", "rope", "rope_dims", "rope_shared", "num_kv_heads"):
            unset = False if name == "rope_shared" else None
            if name not in used and getattr(self, name) is not unset:
                what = "a kv_from layer" if self.kv_from is not None else f"kv_proj={self.kv_proj!r}"
                if self.kv_proj == "low_rank" and self.rope is not None and self.kv_from is None:
                    what += f" with rope={self.rope!r}"
                if self.probs_from is not None:
                    what += " on a probs_from layer"
                raise CompressionSpecError(
                    f"{at}.{name}={getattr(self, name)!r} is not used by {what}; remove it"
                    + (f" (that layer uses: {', '.join(sorted(used))})" if used else "")
                )

    # ---- arithmetic --------------------------------------------------------------------------------
    def kv_cache_elements_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """Elements one cached token (one slot) of this layer takes, per sequence (scales not included)."""
        heads = self.num_kv_heads if self.kv_proj == "merged_heads" else num_kv_heads
        return sum(tensor.elements(self, heads, head_dim) for tensor in self.cached_tensors.values())

    def cache_value_bytes(self, dtype) -> float:
        """Bytes one cached element takes: cache_bits / 8, else the model dtype's size."""
        return self.cache_bits / 8 if self.cache_bits is not None else dtype_num_bytes(dtype)

    @property
    def rank_step(self) -> int:
        return cache_rank_step(self.cache_bits)

    def kv_cache_scale_bytes_per_token(self, dtype) -> int:
        """Bytes of the per-token scales of a low-bit cache: one scale in `dtype` per cached tensor and slot."""
        return len(self.cached_tensors) * dtype_num_bytes(dtype) if self.cache_bits is not None else 0

    def kv_cache_bytes_per_slot(self, num_kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one cached token (one slot) of this layer takes, per sequence: its elements at cache_value_bytes,
        plus the scales of a low-bit cache."""
        values = self.kv_cache_elements_per_token(num_kv_heads, head_dim) * self.cache_value_bytes(dtype)
        return int(values) + self.kv_cache_scale_bytes_per_token(dtype)

    def kv_cache_slots(self, num_tokens: int) -> int:
        """Cache slots this layer holds for a sequence of num_tokens tokens."""
        if not self.cached_tensors:
            return 0
        if self.is_window:
            return min(num_tokens, self.window + self.sinks)
        return num_tokens


@dataclass
class CalibrationSpec:
    """Which text the surgery's calibration statistics come from (models/calibration.py reads it)."""

    source: str | None = None  # None: the training data source
    tokens: int = 131072
    seq_len: int = 512

    @classmethod
    def from_dict(cls, data: dict | None) -> "CalibrationSpec":
        data = data or {}
        _check_keys(data, [f.name for f in fields(cls)], "compression.calibration")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "seq_len": self.seq_len}

    def validate(self) -> None:
        if self.source is not None and not isinstance(self.source, str):
            raise CompressionSpecError(f"compression.calibration.source must be a string or null, got {self.source!r}")
        _check_int(self.tokens, "compression.calibration.tokens", minimum=1)
        _check_int(self.seq_len, "compression.calibration.seq_len", minimum=1)


def _pyramid_settings(value) -> PyramidSettings:
    try:
        return PyramidSettings.from_any(value)
    except PyramidError as err:  # its messages start at "pyramid...": say where in the config that is
        raise CompressionSpecError(f"compression.inference.{err}") from None


@dataclass
class CompressionSpec:
    """The whole model's compression: one LayerSpec per decoder layer plus calibration and inference settings."""

    layers: list[LayerSpec]
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    pyramid: PyramidSettings | None = None  # serialized under "inference": {"pyramid": ...}

    @classmethod
    def dense(cls, num_layers: int) -> "CompressionSpec":
        """The uncompressed model: every layer global, dense, self-contained."""
        return cls(layers=[LayerSpec() for _ in range(num_layers)])

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionSpec":
        _check_keys(data, ["layers", "calibration", "inference"], "compression")
        if "layers" not in data:
            raise CompressionSpecError("compression.layers is missing: one entry per decoder layer")
        layers = data["layers"]
        if not isinstance(layers, (list, tuple)):
            raise CompressionSpecError(f"compression.layers must be a list, got {type(layers).__name__}")
        parsed = []
        for i, layer in enumerate(layers):
            if isinstance(layer, LayerSpec):
                parsed.append(copy.deepcopy(layer))
            else:
                parsed.append(LayerSpec.from_dict(layer, i))
        inference = data.get("inference") or {}
        _check_keys(inference, ["pyramid"], "compression.inference")
        pyramid = inference.get("pyramid")
        return cls(
            layers=parsed,
            calibration=CalibrationSpec.from_dict(data.get("calibration")),
            pyramid=_pyramid_settings(pyramid) if pyramid is not None else None,
        )

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "calibration": self.calibration.to_dict(),
            "inference": {"pyramid": self.pyramid.to_dict() if self.pyramid is not None else None},
        }

    def validate(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raises CompressionSpecError naming the layer, the field, the bad value and what is allowed."""
        if len(self.layers) != num_layers:
            raise CompressionSpecError(
                f"compression.layers has {len(self.layers)} entries but the model has num_hidden_layers={num_layers}; "
                f"give exactly one entry per decoder layer"
            )
        if head_dim % 2:
            raise CompressionSpecError(f"head_dim={head_dim} must be even for rotary embeddings")
        for i, layer in enumerate(self.layers):
            layer.validate(i, num_heads, num_kv_heads, head_dim)
        for i, layer in enumerate(self.layers):
            at = f"compression.layers[{i}]"
            if layer.kv_from is not None:
                j = layer.kv_from
                source = self.layers[j]
                if source.kv_from is not None:
                    raise CompressionSpecError(
                        f"{at}.kv_from={j} is invalid: layer {j} itself reads layer {source.kv_from}'s K/V "
                        f"(kv_from={source.kv_from}); point at the producer: kv_from={source.kv_from}"
                    )
                if source.probs_from is not None:
                    raise CompressionSpecError(
                        f"{at}.kv_from={j} is invalid: layer {j} reuses layer {source.probs_from}'s probabilities "
                        f"and caches no keys; point at a layer with its own K/V"
                    )
                if source.rope_shared:
                    raise CompressionSpecError(
                        f"{at}.kv_from={j} is invalid: layer {j} has rope_shared=true, whose readers need a q_rope "
                        f"projection of their own (not built for kv_from consumers); share from another layer or "
                        f"set rope_shared=false on layer {j}"
                    )
                self._check_same_layout(i, "kv_from", j)
            if layer.probs_from is not None:
                j = layer.probs_from
                source = self.layers[j]
                if source.probs_from is not None:
                    raise CompressionSpecError(
                        f"{at}.probs_from={j} is invalid: layer {j} itself reuses layer {source.probs_from}'s "
                        f"probabilities; point at the producer: probs_from={source.probs_from}"
                    )
                self._check_same_layout(i, "probs_from", j)
        self.calibration.validate()
        if self.pyramid is not None:
            _pyramid_settings(self.pyramid)

    def _check_same_layout(self, i: int, name: str, j: int) -> None:
        # A consumer attends over exactly the producer's key slots, so it must see the same tokens.
        consumer, producer = self.layers[i], self.layers[j]
        if consumer.layout != producer.layout or consumer.attention != producer.attention:
            def describe(layer: LayerSpec) -> str:
                return (f"attention='window', window={layer.window}, sinks={layer.sinks}"
                        if layer.is_window else "attention='global'")
            raise CompressionSpecError(
                f"compression.layers[{i}].{name}={j}: layer {i} has {describe(consumer)} but layer {j} has "
                f"{describe(producer)}; a consumer attends over its producer's cache slots, so give it the same "
                f"attention, window and sinks"
            )

    # ---- arithmetic --------------------------------------------------------------------------------
    def kv_cache_elements_per_token(self, layer_idx: int, num_kv_heads: int, head_dim: int) -> int:
        """Elements one cached token of layer `layer_idx` takes (0 for a kv_from consumer)."""
        return self.layers[layer_idx].kv_cache_elements_per_token(num_kv_heads, head_dim)

    def kv_cache_bytes(self, num_tokens: int, *, num_kv_heads: int, head_dim: int, dtype,
                       batch_size: int = 1) -> int:
        """Bytes the cache holds for `batch_size` sequences of `num_tokens` tokens: global layers hold every
        token, window layers at most window + sinks, kv_from consumers nothing."""
        per_sequence = sum(
            layer.kv_cache_bytes_per_slot(num_kv_heads, head_dim, dtype) * layer.kv_cache_slots(num_tokens)
            for layer in self.layers
        )
        return per_sequence * batch_size

    def kv_cache_bytes_per_token(self, *, num_kv_heads: int, head_dim: int, dtype,
                                 num_tokens: int | None = None) -> float:
        """Cache bytes per token of one sequence. With num_tokens=None, the long-sequence rate: only global
        layers grow with the sequence (window layers are a constant that amortizes away)."""
        if num_tokens is None:
            return float(sum(layer.kv_cache_bytes_per_slot(num_kv_heads, head_dim, dtype)
                             for layer in self.layers if not layer.is_window))
        return self.kv_cache_bytes(num_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype) / num_tokens


# ---------------------------------------------------------------------------------------------------
# A base model's shapes and its KV-byte arithmetic (what a spec is validated and budgeted against)


@dataclass(frozen=True)
class Geometry:
    """The attention shapes of a (base) model config: what `CompressionSpec.validate` checks a spec against."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> "Geometry":
        return cls(config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads, head_dim_of(config), config.hidden_size)

    @property
    def kv_dims(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_spec(self, spec: "CompressionSpec") -> None:
        """`spec.validate` against these shapes (raises CompressionSpecError)."""
        spec.validate(self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)


def original_kv_bytes_per_token(geometry: Geometry, dtype: str = "bfloat16") -> int:
    """The uncompressed model's KV bytes per token: L x 2 x n_kv x d x bytes (23,040 for SmolLM2 in bf16)."""
    return geometry.num_layers * 2 * geometry.kv_dims * dtype_num_bytes(dtype)


def layer_slot_fraction(layer: LayerSpec, context_tokens: int | None) -> float:
    """This layer's cache slots per token of context, relative to a global layer (1 for global layers)."""
    if not layer.is_window:
        return 1.0
    if context_tokens is None:
        return 0.0
    return layer.kv_cache_slots(context_tokens) / context_tokens


class KVForgeConfig(PretrainedConfig):
    r"""A Llama-family decoder (Llama, Mistral, Qwen2) whose attention layers follow `compression`.

    Beyond the usual Llama fields:
        attention_bias: bias on q/k/v projections (and on the K/V down-projections that replace them).
        attention_output_bias: bias on o_proj (Llama's attention_bias covers o_proj too; Qwen2 has none there).
        compression: the serialized CompressionSpec; None or {} means the uncompressed (all dense, global) model.
        base_model_type: the architecture the weights came from ("llama", "mistral", "qwen2"), for export and logs.
    """

    model_type = "kvforge"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    compression: dict | CompressionSpec | None = None  # stored as the spec's dict
    base_model_type: str = "llama"

    def __post_init__(self, **kwargs):
        self.head_dim = head_dim_of(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        _check_choice(self.base_model_type, SUPPORTED_BASE_MODEL_TYPES, "base_model_type")
        # Store the normalized spec so config.json describes the model completely.
        if isinstance(self.compression, CompressionSpec):
            spec = copy.deepcopy(self.compression)
        elif not self.compression:
            spec = CompressionSpec.dense(self.num_hidden_layers)
        else:
            spec = CompressionSpec.from_dict(self.compression)
        spec.validate(self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        self.compression = spec.to_dict()

    @property
    def compression_spec(self) -> CompressionSpec:
        """The parsed spec (parsed on each access, so edits to `compression` are never stale)."""
        return CompressionSpec.from_dict(self.compression)

    def kv_cache_elements_per_token(self, layer_idx: int) -> int:
        return self.compression_spec.kv_cache_elements_per_token(layer_idx, self.num_key_value_heads, self.head_dim)

    def kv_cache_bytes(self, num_tokens: int, dtype, batch_size: int = 1) -> int:
        return self.compression_spec.kv_cache_bytes(
            num_tokens, num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, dtype=dtype,
            batch_size=batch_size)

    def kv_cache_bytes_per_token(self, dtype, num_tokens: int | None = None) -> float:
        return self.compression_spec.kv_cache_bytes_per_token(
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, dtype=dtype, num_tokens=num_tokens)

    @classmethod
    def from_base_config(cls, base_config: PretrainedConfig, spec: CompressionSpec | dict | None = None,
                         **overrides: Any) -> "KVForgeConfig":
        """A KVForgeConfig with the architecture of a Llama / Mistral / Qwen2 config and the given spec.

        Raises ValueError for other architectures and CompressionSpecError for a spec that does not fit.
        """
        base_type = getattr(base_config, "model_type", None)
        if base_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(
                f"base model_type={base_type!r} is not supported; supported: {', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
            )
        b = base_config
        if base_type == "qwen2":  # Qwen2 hard-codes q/k/v bias and no o_proj bias
            attention_bias, output_bias, mlp_bias = True, False, False
        elif base_type == "mistral":
            attention_bias, output_bias, mlp_bias = False, False, False
        else:
            attention_bias = output_bias = bool(getattr(b, "attention_bias", False))
            mlp_bias = bool(getattr(b, "mlp_bias", False))
        window = getattr(b, "sliding_window", None)
        if base_type == "qwen2" and not getattr(b, "use_sliding_window", False):
            window = None
        if window is not None:
            logger.warning(
                f"the base {base_type} config uses sliding_window={window}; KVForge layers follow the spec only, "
                f"so set attention='window', window={window} in the spec where the base model slides"
            )
        kwargs = dict(
            vocab_size=b.vocab_size,
            hidden_size=b.hidden_size,
            intermediate_size=b.intermediate_size,
            num_hidden_layers=b.num_hidden_layers,
            num_attention_heads=b.num_attention_heads,
            num_key_value_heads=b.num_key_value_heads,
            head_dim=head_dim_of(b),
            hidden_act=b.hidden_act,
            max_position_embeddings=b.max_position_embeddings,
            initializer_range=b.initializer_range,
            rms_norm_eps=b.rms_norm_eps,
            use_cache=b.use_cache,
            pad_token_id=b.pad_token_id,
            bos_token_id=b.bos_token_id,
            eos_token_id=b.eos_token_id,
            tie_word_embeddings=b.tie_word_embeddings,
            rope_parameters=copy.deepcopy(b.rope_parameters),
            attention_bias=attention_bias,
            attention_output_bias=output_bias,
            attention_dropout=float(getattr(b, "attention_dropout", 0.0) or 0.0),
            mlp_bias=mlp_bias,
            compression=spec,
            base_model_type=base_type,
            dtype=getattr(b, "dtype", None),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


KVForgeConfig.register_for_auto_class()
if __name__.startswith("kvforge."):
    # Inside the kvforge package, AutoConfig knows the type without trust_remote_code; an exported copy
    # (loaded as remote code) leaves the global registry alone.
    from transformers import AutoConfig

    AutoConfig.register(KVForgeConfig.model_type, KVForgeConfig, exist_ok=True)
