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

import math
from typing import Callable, Optional

import torch


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
