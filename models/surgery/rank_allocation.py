"""Choosing low-rank KV ranks: per-matrix energy thresholds, or one global budget spent greedily.

Every low-rank latent direction costs the same cache space (one element per cached token, times the
fraction of tokens that layer keeps: 1 for global layers, (window + sinks) / context for window layers),
and buys back its eigenvalue of reconstruction error. With the spectra of all compressed matrices in
hand, the global allocation is the classic greedy for a separable concave objective:

    repeatedly give one more rank to the matrix whose next eigenvalue (times its weight) per element of
    cache is largest, while the budget allows.

Eigenvalues within a matrix are non-increasing, so the marginal gain of each matrix is non-increasing
and the greedy is optimal for any budget that its costs divide (for equal costs, which is the usual case,
it takes exactly the budget's number of directions: the top-B weighted eigenvalues overall).

Weights: "relative" divides each spectrum by its trace (every matrix's error counts as a fraction of its
own energy, so a layer with large activations does not buy all the rank); "absolute" takes eigenvalues as
they are (squared-error units, comparable only when activations are on the same scale).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable

import torch

NORMALIZATIONS = ("relative", "absolute")


class BudgetError(ValueError):
    """A budget that cannot be met (below the minimum ranks) or a malformed request."""


@dataclass(frozen=True)
class RankCandidate:
    """One low-rank matrix competing for the budget.

    eigenvalues: its (descending) output-covariance spectrum; cost: cache elements per token one rank
    costs; weight: multiplies its eigenvalues (e.g. to favour keys or early layers); rank bounds inclusive.
    """

    key: Hashable
    eigenvalues: torch.Tensor
    cost: float = 1.0
    weight: float = 1.0
    min_rank: int = 1
    max_rank: int = 0   # 0: the full width

    def upper(self) -> int:
        return self.max_rank or self.eigenvalues.numel()


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
        if c.cost <= 0 or c.weight < 0:
            raise BudgetError(f"candidate {c.key!r} needs cost > 0 and weight >= 0, got cost={c.cost}, weight={c.weight}")
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
    if spent > budget * (1 + 1e-12):
        raise BudgetError(f"the minimum ranks alone cost {spent:g} cache elements per token, more than the "
                          f"budget of {budget:g}; raise the budget or lower min_rank")
    # Max-heap of (gain per element of the next rank) over candidates that can still grow.
    heap = [(-float(gains[c.key][c.min_rank]), i) for i, c in enumerate(candidates) if c.min_rank < c.upper()]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = candidates[i]
        if spent + c.cost > budget * (1 + 1e-12):
            continue  # every further rank of this matrix costs the same, so none of them fits either
        ranks[c.key] += 1
        spent += c.cost
        if ranks[c.key] < c.upper():
            heapq.heappush(heap, (-float(gains[c.key][ranks[c.key]]), i))
    return ranks
