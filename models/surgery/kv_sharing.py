"""Cross-layer KV sharing (MixAttention arXiv 2409.15012, Character.AI): consumers read a producer's cache.

A layer with kv_from = j has no K/V projections; its queries attend over layer j's cached keys and
values. Nothing is computed from calibration data: the only choice is how the producer's K/V projections
are initialised (`SurgerySettings.kv_sharing_init`):

  * "producer" (default): keep layer j's own projections. The producer computes exactly what it computed
    before; the consumers' attention changes.
  * "average": give the producer the mean of the K/V projections (weights and biases) of the whole group
    (j and every layer reading it), a compromise between the layers that will share the cache. Note the
    averaged projections still read the producer's own input.

Window / global layouts need no weights either: a window layer keeps its projections and attends to the
last `window` tokens (plus `sinks`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..configuration_kvforge import CompressionSpec
from . import head_merging
from .base import DenseAttention, Transform, dense_attention
from .settings import SurgerySettings


def sharing_groups(kv_from: list[Optional[int]]) -> dict[int, list[int]]:
    """{producer: [producer, consumer, ...]} for every layer that some other layer reads (sorted)."""
    groups: dict[int, list[int]] = {}
    for i, j in enumerate(kv_from):
        if j is not None:
            groups.setdefault(j, [j]).append(i)
    return groups


def averaged_projection(weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]]
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The elementwise mean of a group's projection weights (and biases), in float64 then cast back."""
    if not weights:
        raise ValueError("averaged_projection needs at least one weight")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"cannot average projections of different shapes {sorted(shapes)}")
    weight = torch.stack([w.to(torch.float64) for w in weights]).mean(0).to(weights[0].dtype)
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):
        raise ValueError("cannot average projections where only some have a bias")
    bias = torch.stack([b.to(torch.float64) for b in biases]).mean(0).to(biases[0].dtype)
    return weight, bias


# ---------------------------------------------------------------------------------------------------
# Surgery: the producers' projections, and the per-layer transform of a consumer


def effective_attention(state: Mapping[str, torch.Tensor], spec: CompressionSpec, settings: SurgerySettings
                        ) -> list[DenseAttention]:
    """Every layer's dense projections, with shared-cache producers averaged when kv_sharing_init='average'."""
    layers = [dense_attention(state, i) for i in range(len(spec.layers))]
    if settings.kv_sharing_init == "average":
        for producer, group in sharing_groups([l.kv_from for l in spec.layers]).items():
            lp = layers[producer]
            lp.k_weight, lp.k_bias = averaged_projection([layers[i].k_weight for i in group],
                                                         [layers[i].k_bias for i in group])
            lp.v_weight, lp.v_bias = averaged_projection([layers[i].v_weight for i in group],
                                                         [layers[i].v_bias for i in group])
    return layers


def transform_layer(t: Transform, i: int, entry: dict[str, Any]) -> None:
    """Layer i reads layer kv_from's cache: no K/V projections of its own; a merged-heads producer's fold
    goes into its q_proj / o_proj (head_merging.fold_into_reader)."""
    layer = t.spec.layers[i]
    entry["kv"] = f"reads layer {layer.kv_from}"
    if layer.kv_from in t.merged_folds:
        head_merging.fold_into_reader(t, i, entry)
