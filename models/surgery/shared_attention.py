"""Shared attention weights (Liao & Vargas 2024, arXiv 2407.12866): later layers reuse a layer's probabilities.

A layer with probs_from = j computes no queries or keys and no QK^T: it applies layer j's attention
probabilities to its own values (v_proj, or v_down/v_up when low-rank) and projects with its own o_proj.
It caches values only. The weights need no change beyond dropping q_proj and k_proj; what matters is
*which* layers may share, and that is read off calibration data.

Span choice. `calibration.attention_divergence` gives D[i, j], the mean divergence between the
attention distributions of layers i and j (per head, averaged over heads, query positions and rows;
Jensen-Shannon or 1 - cosine). A span [a, b] makes layers a+1..b reuse layer a's probabilities; a layer
joining a span costs D[i, a] (its divergence from the span's first layer, which is what it will use).

  * threshold t: walk the layers in order; layer i joins the current span if D[i, anchor] <= t, else it
    starts a new span (anchor = i). Spans of one layer share nothing.
  * count n: n times, make the one layer whose joining costs least a consumer: candidates are layers
    i >= 1 that are not consumers and whose successor is not a consumer (so no other layer's anchor
    changes), joining the span of layer i - 1 (anchor = i - 1 or its anchor). Greedy, not optimal, and
    deterministic (ties go to the earlier layer).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch

from ..calibration import CalibrationStatistics
from ..configuration_kvforge import CompressionSpec, Geometry
from .settings import SurgeryError, SurgerySettings


CanShare = Callable[[int, int], bool]


def _always(i: int, j: int) -> bool:
    return True


def spans_by_threshold(divergence: torch.Tensor, threshold: float, can_share: CanShare = _always
                       ) -> list[Optional[int]]:
    """probs_from per layer (None = computes its own) from a divergence threshold.

    Args:
        divergence: [L, L], [i, j] defined for j < i.
        can_share: can_share(i, j) says whether layer i may reuse layer j's probabilities (e.g. same
            window layout, not a kv_from consumer); default: always.

    Raises:
        ValueError: a negative or non-finite threshold, or a malformed matrix.
    """
    num_layers = _check_matrix(divergence)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"shared-attention threshold must be a finite number >= 0, got {threshold}")
    probs_from: list[Optional[int]] = [None] * num_layers
    anchor = 0
    for i in range(1, num_layers):
        if can_share(i, anchor) and float(divergence[i, anchor]) <= threshold:
            probs_from[i] = anchor
        else:
            anchor = i
    return probs_from


def spans_by_count(divergence: torch.Tensor, count: int, can_share: CanShare = _always) -> list[Optional[int]]:
    """probs_from per layer with exactly `count` consumers chosen greedily (see the module doc).

    Raises:
        ValueError: count negative or more consumers than can be placed.
    """
    num_layers = _check_matrix(divergence)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < num_layers:
        raise ValueError(f"shared-attention count must be an integer in [0, {num_layers - 1}] (layers that reuse "
                         f"an earlier layer's probabilities), got {count!r}")
    probs_from: list[Optional[int]] = [None] * num_layers

    def anchor_of(i: int) -> int:
        return i if probs_from[i] is None else probs_from[i]

    for _ in range(count):
        best, best_cost = None, math.inf
        for i in range(1, num_layers):
            if probs_from[i] is not None or not can_share(i, anchor_of(i - 1)):
                continue
            if i + 1 < num_layers and probs_from[i + 1] is not None:
                continue  # layer i anchors a span; making it a consumer would re-anchor that span
            cost = float(divergence[i, anchor_of(i - 1)])
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            placed = sum(p is not None for p in probs_from)
            raise ValueError(f"only {placed} of the {count} shared-attention consumers asked for can be placed among "
                             f"{num_layers} layers (layers must be adjacent to a compatible earlier layer)")
        probs_from[best] = anchor_of(best - 1)
    return probs_from


def _check_matrix(divergence: torch.Tensor) -> int:
    if divergence.ndim != 2 or divergence.shape[0] != divergence.shape[1] or divergence.shape[0] < 1:
        raise ValueError(f"divergence must be a square [L, L] matrix, got shape {tuple(divergence.shape)}")
    lower = torch.tril(torch.ones_like(divergence, dtype=torch.bool), diagonal=-1)
    if not torch.isfinite(divergence[lower]).all():
        raise ValueError("divergence has non-finite entries below the diagonal; recompute the calibration statistics")
    return divergence.shape[0]


# ---------------------------------------------------------------------------------------------------
# Surgery: the spec's spans chosen from calibration attention maps


def choose_shared_attention(spec: CompressionSpec, stats: CalibrationStatistics, geometry: Geometry,
                            settings: SurgerySettings) -> CompressionSpec:
    """A copy of `spec` whose probs_from come from the calibration attention maps (replacing the spec's).

    A low-rank layer that becomes a consumer keeps a value latent only (its keys are no longer needed):
    v_rank as given for pre_rope_latent, min(kv_rank, n_kv d) for partial.
    """
    if stats.attention_divergence is None:
        raise SurgeryError("choosing shared-attention spans needs attention maps in the calibration statistics "
                           "(collect them with attention_rows > 0)")
    layers = spec.layers

    def can_share(i: int, j: int) -> bool:
        a, b = layers[i], layers[j]
        return a.kv_from is None and b.probs_from is None and a.layout == b.layout and a.attention == b.attention

    how = settings.shared_attention
    try:
        if "count" in how:
            probs_from = spans_by_count(stats.attention_divergence, how["count"], can_share)
        else:
            probs_from = spans_by_threshold(stats.attention_divergence, how["threshold"], can_share)
    except ValueError as e:
        raise SurgeryError(f"surgery.shared_attention={how!r}: {e}") from None
    new = copy.deepcopy(spec)
    for layer in new.layers:
        layer.probs_from = None
    for layer, source in zip(new.layers, probs_from):
        if source is None:
            continue
        layer.probs_from = source
        if layer.kv_proj == "low_rank":
            v_rank = layer.v_rank if layer.rope == "pre_rope_latent" else min(layer.kv_rank, geometry.kv_dims)
            layer.k_rank = layer.kv_rank = layer.rope = layer.rope_dims = None
            layer.rope_shared = False
            layer.v_rank = v_rank
    return new
