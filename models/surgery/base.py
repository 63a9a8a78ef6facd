"""What every method file of the surgery shares: a layer's pretrained attention projections
(`DenseAttention`), their calibration moments, and the `Transform` the per-layer transforms write the
compressed state dict into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ..calibration import CalibrationStatistics
from ..configuration_kvforge import CompressionSpec, Geometry
from .linalg import pair_energy
from .settings import SurgeryError, SurgerySettings


def attention_prefix(layer: int) -> str:
    return f"model.layers.{layer}.self_attn."


# ---------------------------------------------------------------------------------------------------
# Per-layer dense projections


@dataclass
class DenseAttention:
    """One layer's pretrained attention projections, [d_out, H] weights and [d_out] biases (or None)."""

    q_weight: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    v_weight: torch.Tensor
    v_bias: Optional[torch.Tensor]
    o_weight: torch.Tensor
    o_bias: Optional[torch.Tensor]


def dense_attention(state: Mapping[str, torch.Tensor], layer: int) -> DenseAttention:
    p = attention_prefix(layer)
    missing = [f"{p}{n}_proj.weight" for n in "qkvo" if f"{p}{n}_proj.weight" not in state]
    if missing:
        raise SurgeryError(f"the pretrained state dict lacks {missing}; surgery expects a Llama/Mistral/Qwen2 model")
    return DenseAttention(*[t for n in "qkvo" for t in (state[f"{p}{n}_proj.weight"], state.get(f"{p}{n}_proj.bias"))])


def kv_moments(stats: CalibrationStatistics, layer: int, attn: DenseAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the concatenated pre-RoPE [k; v] of `layer` with its (effective) projections."""
    weight = torch.cat([attn.k_weight, attn.v_weight])
    bias = None
    if attn.k_bias is not None or attn.v_bias is not None:
        bias = torch.cat([attn.k_bias if attn.k_bias is not None else torch.zeros(attn.k_weight.shape[0]),
                          attn.v_bias if attn.v_bias is not None else torch.zeros(attn.v_weight.shape[0])])
    return stats.output_moments(layer, weight, bias)


def q_pair_energy(stats: CalibrationStatistics, layer: int, attn: DenseAttention, geometry: Geometry) -> torch.Tensor:
    second, _ = stats.output_moments(layer, attn.q_weight, attn.q_bias)
    return pair_energy(second, geometry.num_heads, geometry.head_dim)


# ---------------------------------------------------------------------------------------------------
# What a per-layer transform reads and writes


@dataclass
class Transform:
    """The inputs of step 2 (transform the state dict) and the state dict it builds.

    Each method file's `transform_layer(t, i, entry)` writes layer i's attention tensors with `t.put` and
    describes them in the report `entry`. `expected` (name -> shape of the target module's state) decides
    only optional biases (v_up.bias); `rope_inv_freq` [d/2] is needed by init="output_aware" for pre-RoPE
    key latents.
    """

    spec: CompressionSpec
    geometry: Geometry
    stats: Optional[CalibrationStatistics]
    settings: SurgerySettings
    expected: Mapping[str, torch.Size]
    rope_inv_freq: Optional[torch.Tensor]
    attn: list[DenseAttention]
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    # A merged-heads producer's fold (key coefficients, value rebuild maps) applies to the queries and o_proj
    # of every layer that attends over its cache, its kv_from consumers included.
    merged_folds: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def put(self, layer: int, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        p = attention_prefix(layer)
        self.out[f"{p}{name}.weight"] = weight.contiguous()
        if bias is not None:
            self.out[f"{p}{name}.bias"] = bias.contiguous()
