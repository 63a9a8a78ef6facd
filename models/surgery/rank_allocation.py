"""Choosing low-rank KV ranks: per-matrix energy thresholds, or one global budget spent greedily.

Every low-rank latent direction costs cache space (one element per cached token at its layer's bytes per
element, 1 for an 8-bit cache and 1/2 for a 4-bit one, times the fraction of tokens that layer keeps: 1 for global layers,
(window + sinks) / context for window layers), and buys back its eigenvalue of reconstruction error. With the
spectra of all compressed matrices in hand, the global allocation is the classic greedy for a separable concave
objective:

    repeatedly give one more rank to the matrix whose next eigenvalue (times its weight) per element of
    cache is largest, while the budget allows.

Eigenvalues within a matrix are non-increasing, so the marginal gain of each matrix is non-increasing
and the greedy is optimal for any budget that its costs divide (for equal costs, which is the usual case,
it takes exactly the budget's number of directions: the top-B weighted eigenvalues overall). A 4-bit
layer's ranks grow two directions at a time (its values pair up in bytes), priced by their mean, and every rank
by surgery.rank_multiple's step too (default: cache rows of 16 bytes, which Triton's decode kernel loads fastest).

Weights: "relative" divides each spectrum by its trace (every matrix's error counts as a fraction of its
own energy, so a layer with large activations does not buy all the rank); "absolute" takes eigenvalues as
they are (squared-error units, comparable only when activations are on the same scale).
"""

from __future__ import annotations

import copy
import heapq
import math
from dataclasses import dataclass
from typing import Hashable

import torch

from ..configuration_kvforge import (
    CompressionSpec, Geometry, LayerSpec, aligned_rank_step, layer_slot_fraction, original_kv_bytes_per_token,
)
from .linalg import rank_for_energy
from .low_rank import LowRankProblem
from .settings import NORMALIZATIONS, SurgeryError, SurgerySettings


class BudgetError(ValueError):
    """A budget that cannot be met (below the minimum ranks) or a malformed request."""


@dataclass(frozen=True)
class RankCandidate:
    """One low-rank matrix competing for the budget.

    eigenvalues: its (descending) output-covariance spectrum; cost: what one rank costs in cache per token
    (resolve_ranks: bytes); weight: multiplies its eigenvalues (e.g. to favour keys or early layers); rank bounds
    inclusive; step: ranks grow by this many directions at once (2 for a 4-bit cache, whose values pair up in
    bytes), from min_rank, and stay at or below the largest such rank <= max_rank.
    """

    key: Hashable
    eigenvalues: torch.Tensor
    cost: float = 1.0
    weight: float = 1.0
    min_rank: int = 1
    max_rank: int = 0   # 0: the full width
    step: int = 1

    def upper(self) -> int:
        top = self.max_rank or self.eigenvalues.numel()
        return top - (top - self.min_rank) % self.step


def allocate_ranks(candidates: list[RankCandidate], budget: float, *, normalization: str = "relative"
                   ) -> dict[Hashable, int]:
    """Ranks for every candidate whose total cost sum(rank * cost) is <= budget, spent greedily.

    Raises:
        BudgetError: the minimum ranks alone exceed the budget, a bad normalization, or a bad candidate.
    """
    if normalization not in NORMALIZATIONS:
        raise BudgetError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    keys = [c.key for c in candidates]
    if len(set(keys)) != len(keys):
        raise BudgetError(f"candidate keys must be unique, got {keys}")
    ranks: dict[Hashable, int] = {}
    spent = 0.0
    gains: dict[Hashable, torch.Tensor] = {}
    for c in candidates:
        if c.cost <= 0 or c.weight < 0 or c.step < 1:
            raise BudgetError(f"candidate {c.key!r} needs cost > 0, weight >= 0 and step >= 1, got cost={c.cost}, "
                              f"weight={c.weight}, step={c.step}")
        if not 0 <= c.min_rank <= c.upper() <= c.eigenvalues.numel():
            raise BudgetError(f"candidate {c.key!r}: need 0 <= min_rank={c.min_rank} <= max_rank={c.upper()} "
                              f"<= width {c.eigenvalues.numel()}")
        spectrum = c.eigenvalues.to(torch.float64).clamp_min(0.0)
        total = float(spectrum.sum())
        if normalization == "relative" and total > 0:
            spectrum = spectrum / total
        gains[c.key] = spectrum * c.weight / c.cost
        ranks[c.key] = c.min_rank
        spent += c.min_rank * c.cost

    def next_gain(c: RankCandidate) -> float:  # per element of the next step of directions
        return float(gains[c.key][ranks[c.key]:ranks[c.key] + c.step].mean())

    if spent > budget * (1 + 1e-12):
        raise BudgetError(f"the minimum ranks alone cost {spent:g} (cache per token), more than the "
                          f"budget of {budget:g}; raise the budget or lower min_rank")
    # Max-heap of (gain per element of the next step) over candidates that can still grow.
    heap = [(-next_gain(c), i) for i, c in enumerate(candidates) if c.min_rank < c.upper()]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = candidates[i]
        if spent + c.step * c.cost > budget * (1 + 1e-12):
            continue  # every further step of this matrix costs the same, so none of them fits either
        ranks[c.key] += c.step
        spent += c.step * c.cost
        if ranks[c.key] < c.upper():
            heapq.heappush(heap, (-next_gain(c), i))
    return ranks


# ---------------------------------------------------------------------------------------------------
# Surgery: a spec's low-rank ranks under SurgerySettings.rank_allocation


_RANK_FIELD = {"k": "k_rank", "v": "v_rank", "kv": "kv_rank"}


def rank_step(layer: LayerSpec, width: int, settings: SurgerySettings) -> int:
    """What a latent of `width` columns at `layer` grows by: its format's step (LayerSpec.rank_step) and
    settings.rank_multiple ("auto": 16-byte cache rows), or the format's step alone where that is wider than the
    matrix (no aligned rank fits)."""
    multiple = settings.rank_multiple
    if multiple == "auto":
        multiple = aligned_rank_step(layer.cache_bits, settings.cache_dtype)
    step = math.lcm(layer.rank_step, multiple)
    return step if step <= width else layer.rank_step


def resolve_ranks(spec: CompressionSpec, problems: list[LowRankProblem], geometry: Geometry,
                  settings: SurgerySettings) -> CompressionSpec:
    """A copy of `spec` with low-rank ranks chosen by settings.rank_allocation (as_given: unchanged).

    greedy: the budget (settings, or the spec's own total) minus what every non-latent part of the cache
    costs is spent on latent directions by allocate_ranks.

    Raises:
        SurgeryError: a budget below what the fixed parts of the cache (dense layers, rotary dims) and one
            rank per latent already cost.
    """
    if settings.rank_allocation == "as_given" or not problems:
        return spec
    new = copy.deepcopy(spec)
    if settings.rank_allocation == "energy":
        for p in problems:
            rank = rank_for_energy(p.spectrum, settings.energy_threshold)
            step = rank_step(spec.layers[p.layer], p.max_rank, settings)
            rank = min(p.max_rank - p.max_rank % step, rank + (-rank) % step)  # up to a whole step, within the width
            setattr(new.layers[p.layer], _RANK_FIELD[p.part], rank)
        return new
    fractions = [layer_slot_fraction(l, settings.context_tokens) for l in spec.layers]
    # Budgets are spent in bytes, so a low-bit layer (cache_bits) buys more directions per byte. Each latent
    # direction costs its layer's bytes per cached element per token, times the layer's slot fraction. Window
    # layers with context_tokens=None cost nothing; a tiny cost keeps the greedy well defined (they fill first).
    dtype = settings.cache_dtype
    costs = {(p.layer, p.part): max(fractions[p.layer], 1e-9) * spec.layers[p.layer].cache_value_bytes(dtype)
             for p in problems}
    latent_now = sum(getattr(spec.layers[p.layer], _RANK_FIELD[p.part]) * costs[(p.layer, p.part)] for p in problems)
    total_now = sum(l.kv_cache_bytes_per_slot(geometry.num_kv_heads, geometry.head_dim, dtype) * f
                    for l, f in zip(spec.layers, fractions))
    fixed = total_now - latent_now  # dense layers, rotary dims, a low-bit cache's scales
    if settings.budget_fraction is not None:
        original = original_kv_bytes_per_token(geometry, dtype)
        target = settings.budget_fraction * original
        what = f"budget_fraction={settings.budget_fraction} of {original} bytes/token"
    elif settings.budget_bytes_per_token is not None:
        target = settings.budget_bytes_per_token
        what = f"budget_bytes_per_token={settings.budget_bytes_per_token}"
    else:
        target, what = total_now, "the spec's own total"
    # Byte budgets are integers for global layers: round away float noise.
    latent_budget = math.floor(target - fixed + 1e-6)
    normalization, weights = settings.budget_normalization, {(p.layer, p.part): 1.0 for p in problems}
    if settings.init == "output_aware" and normalization == "relative":
        # A layer's key and value spectra are both in units of its attention-output error (low_rank.value_spread),
        # so they compete as they are; layers compete relative to their value energy (the weighted trace of
        # the value spectrum): the same "fraction of what the layer carries" as the PCA's relative budget.
        energy = {p.layer: float(p.spectrum.sum()) for p in problems if p.part in ("v", "kv")}
        weights = {(p.layer, p.part): 1.0 / energy[p.layer] if energy[p.layer] > 0 else 1.0 for p in problems}
        normalization = "absolute"
    steps = {(p.layer, p.part): rank_step(spec.layers[p.layer], p.max_rank, settings) for p in problems}
    candidates = [RankCandidate(key=(p.layer, p.part), eigenvalues=p.spectrum, cost=costs[(p.layer, p.part)],
                                max_rank=p.max_rank, weight=weights[(p.layer, p.part)],
                                min_rank=steps[(p.layer, p.part)], step=steps[(p.layer, p.part)])
                  for p in problems]
    try:
        ranks = allocate_ranks(candidates, latent_budget, normalization=normalization)
    except BudgetError as e:
        raise SurgeryError(
            f"the KV budget ({what}) leaves {latent_budget} bytes/token for low-rank latents after "
            f"{fixed:g} for the rest of the cache, too little: {e}") from None
    for (layer, part), rank in ranks.items():
        setattr(new.layers[layer], _RANK_FIELD[part], rank)
    return new
