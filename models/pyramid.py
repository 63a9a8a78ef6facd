"""PyramidKV (Cai et al. 2024, arXiv 2406.02069): after the prompt, each global layer keeps a token budget
that shrinks from the bottom layer to the top, chosen by what the prompt's last queries attend to.

This file ships beside `modeling_kvforge.py` in an exported directory and imports only torch; it reaches
the modeling code only through the objects it is handed (a KVForgeCache, its LayerStorage / SlotLayout /
SlotPlan, the attention modules), so the exported copy and the package copy work alike.

The method, as implemented here:

1. Budgets. Per *cache group* (a global layer that owns its K/V, with the layers that read that cache via
   kv_from / probs_from), `budget` tokens on average: the last `window` prompt tokens and the first
   `sinks` tokens are always kept; the rest of the budget, A = budget - window - sinks on average, is
   spread over the groups bottom to top. `schedule="pyramid"` is the paper's arithmetic sequence: the top
   group gets A / beta, the bottom one 2A - A / beta, the ones between linearly interpolated (so the mean is
   exactly A); `schedule="uniform"` gives every group A (SnapKV-like), the same total.
2. Scores. During the prefill, the last `window` queries of every layer that attends over the group's cache
   (the owner and its kv_from consumers) are softmaxed over all prompt keys, exactly as the layer attends
   (same representation: dense, merged heads, latents), and summed over the window and over the query
   heads of each KV group: [B, K, S]. KV heads are never expanded to query heads. Groups whose cache has no
   per-head token axis (latent caches) or whose slots are shared with probs_from consumers select one set
   of tokens per row (scores summed over K too).
3. Selection. Scores are smoothed by 1D pooling over the sequence (avg or max, `kernel_size`), then the
   top-(budget) slots are kept per (row, KV head), with sinks and the window forced in and padding forced
   out. Kept slots are ordered by token index, padding (if a short row has any) first, so every head of a
   row has the same valid-slot pattern and one [B, 1, 1, T, S] mask serves all heads after compaction.
4. Compaction. Each member layer's cache tensors are gathered into new, smaller tensors (memory is freed,
   not masked), the group gets its own global SlotLayout holding what its slots now contain, and decoding
   appends to it as usual. Keys are cached already rotated (or with their positions kept beside the
   latents), so positions survive the selection.

How the modeling code calls it (the seam): a KVForgeCache made with PyramidKV settings (its `pyramid=`
argument, or the config's `compression.inference.pyramid`) holds a PyramidKV, and its LayerStorages point to
it. KVForgeModel.forward asks `plan_for(layer_idx, plan, storage)` for each layer's SlotPlan (the group's
compacted layout once the prefill is done) and calls `finish_step(cache)` after committing the step; each
attention layer calls `observe_layer(...)` during the prefill when `wants(layer_idx)`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

SCHEDULES = ("pyramid", "uniform")
POOLINGS = ("avgpool", "maxpool", "none")


class PyramidError(ValueError):
    """PyramidKV settings or a cache they cannot apply to; the message names the value and what is allowed."""


# ================================================================================================
# Settings and budgets
# ================================================================================================


@dataclass
class PyramidSettings:
    """What `compression.inference.pyramid` holds, plus the knobs the paper leaves open.

    budget: average tokens kept per cache group (sinks and window included).
    schedule: "pyramid" (decreasing with depth) or "uniform" (SnapKV-like, same total).
    window: the last `window` prompt tokens score the others and are always kept.
    pooling / kernel_size: smoothing of the scores along the sequence before top-k ("none" to skip).
    beta: the top group gets (budget - window - sinks) / beta selectable tokens (paper: 20).
    sinks: the first tokens of every row, always kept (StreamingLLM's attention sinks).
    """

    budget: int
    schedule: str = "pyramid"
    window: int = 8
    pooling: str = "avgpool"
    kernel_size: int = 7
    beta: float = 20.0
    sinks: int = 4

    @classmethod
    def from_any(cls, value: Any, **overrides: Any) -> "PyramidSettings":
        """A PyramidSettings from itself, a mapping, or any object with `to_dict()`.

        Raises PyramidError for unknown keys, a missing budget or an out-of-range value.
        """
        if isinstance(value, PyramidSettings):
            data = asdict(value)
        elif hasattr(value, "to_dict"):
            data = dict(value.to_dict())
        elif isinstance(value, Mapping):
            data = dict(value)
        else:
            raise PyramidError(f"pyramid must be a mapping or PyramidSettings, got {type(value).__name__}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PyramidError(f"pyramid: unknown key(s) {unknown}; allowed: {known}")
        if "budget" not in data or data["budget"] is None:
            raise PyramidError("pyramid.budget is missing (average tokens kept per layer)")
        settings = cls(**data)
        settings.validate()
        return settings

    def validate(self) -> None:
        def positive_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PyramidError(f"pyramid.{name}={value!r}: expected an integer >= {minimum}")

        positive_int("budget", 1)
        positive_int("window", 1)
        positive_int("sinks", 0)
        positive_int("kernel_size", 1)
        if self.schedule not in SCHEDULES:
            raise PyramidError(f"pyramid.schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.pooling not in POOLINGS:
            raise PyramidError(f"pyramid.pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.pooling != "none" and self.kernel_size % 2 == 0:
            raise PyramidError(f"pyramid.kernel_size={self.kernel_size}: expected an odd size (the pooling window "
                               "is centred on each token)")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 1):
            raise PyramidError(f"pyramid.beta={self.beta!r}: expected a number >= 1 (1 = uniform, the paper uses 20)")
        if self.budget < self.window + self.sinks:
            raise PyramidError(
                f"pyramid.budget={self.budget} is smaller than window + sinks = {self.window} + {self.sinks}, "
                f"which every layer keeps; raise the budget or lower window/sinks")

    def to_dict(self) -> dict:
        """What a config stores: the four settings every user picks, plus any other that is not its default."""
        defaults = PyramidSettings(budget=self.budget)
        return {name: value for name, value in asdict(self).items()
                if name in ("budget", "schedule", "window", "pooling") or value != getattr(defaults, name)}


def layer_budgets(settings: PyramidSettings, num_layers: int) -> list[int]:
    """Tokens kept per cache group, bottom to top; their mean is exactly `settings.budget` (integers whose
    sum is budget * num_layers, rounded by largest remainder).

    pyramid: selectable tokens k_l = k_0 - (k_0 - k_top) * l / (L - 1) with k_top = A / beta and
    k_0 = 2A - k_top (the paper's Eq. for the top and bottom layers), A = budget - window - sinks.
    """
    if num_layers < 1:
        raise PyramidError(f"PyramidKV needs at least one global cache layer, got {num_layers}")
    forced = settings.window + settings.sinks
    selectable = settings.budget - forced
    if settings.schedule == "uniform" or num_layers == 1:
        shares = [float(selectable)] * num_layers
    else:
        top = selectable / settings.beta
        bottom = 2 * selectable - top
        shares = [bottom - (bottom - top) * layer / (num_layers - 1) for layer in range(num_layers)]
    floors = [math.floor(s) for s in shares]
    missing = selectable * num_layers - sum(floors)
    by_remainder = sorted(range(num_layers), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in by_remainder[:missing]:
        floors[i] += 1
    return [forced + k for k in floors]


# ================================================================================================
# Scores and selection (pure tensor functions)
# ================================================================================================


def pool_scores(scores: torch.Tensor, pooling: str, kernel_size: int) -> torch.Tensor:
    """scores [..., S] -> [..., S], smoothed along S so that neighbours of an important token survive too."""
    if pooling == "none" or kernel_size == 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "avgpool":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    elif pooling == "maxpool":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        raise PyramidError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
    return pooled.view(shape)


def select_tokens(scores: torch.Tensor, key_index: torch.Tensor, keep: int, *, window: int, sinks: int) -> torch.Tensor:
    """Which slots to keep: scores [B, X, S] (X = KV heads, or 1 for one choice per row), key_index [B, S] (each
    slot's index among its row's real tokens, -1 for padding) -> slot indices [B, X, keep].

    The first `sinks` and last `window` real tokens of every row are always kept, padding only when a row has
    fewer than `keep` real tokens. Kept slots are ordered by token index (padding first), so all heads of a
    row have the same number of padding slots in the same places.
    """
    batch, heads, slots = scores.shape
    if keep > slots:
        raise PyramidError(f"cannot keep {keep} of {slots} slots")
    last = key_index.max(dim=1, keepdim=True).values  # [B, 1]
    real = key_index >= 0
    forced = real & ((key_index < sinks) | (key_index > last - window))  # [B, S]
    ranked = scores.float().masked_fill(forced[:, None], math.inf).masked_fill(~real[:, None], -math.inf)
    top = ranked.topk(keep, dim=-1).indices  # [B, X, keep]
    order = key_index[:, None, :].expand(batch, heads, slots).gather(-1, top).argsort(dim=-1, stable=True)
    return top.gather(-1, order)


def gather_slots(tensor: torch.Tensor, slot_dim: int, slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new tensor of `capacity` slots holding `tensor`'s slots `slots` [B, X, n] first (the rest zero).

    slot_dim 2: tensor [B, K, C, D] (per-head slots; X is K, or 1 for the same slots in every head);
    slot_dim 1: tensor [B, C, R] (a latent shared by all heads; X must be 1).
    """
    batch, heads, kept = slots.shape
    if slot_dim == 2:
        kv_heads, dim = tensor.shape[1], tensor.shape[3]
        if heads not in (1, kv_heads):
            raise PyramidError(f"a per-head selection over {heads} heads cannot apply to a cache with {kv_heads} heads")
        index = slots.expand(batch, kv_heads, kept)[..., None].expand(-1, -1, -1, dim)
        out = tensor.new_zeros(batch, kv_heads, capacity, dim)
        out[:, :, :kept] = tensor.gather(2, index)
        return out
    if slot_dim == 1:
        if heads != 1:
            raise PyramidError("a latent cache (one slot axis for all heads) needs one selection per row, got "
                               f"{heads} per-head selections")
        dim = tensor.shape[2]
        out = tensor.new_zeros(batch, capacity, dim)
        out[:, :kept] = tensor.gather(1, slots[:, 0, :, None].expand(-1, -1, dim))
        return out
    raise PyramidError(f"unsupported slot dim {slot_dim}")


# ================================================================================================
# Cache groups: which layers share one set of slots
# ================================================================================================


@dataclass
class CacheGroup:
    """Layers whose caches hold the same tokens in the same slots, and so keep the same tokens.

    owner: the global layer computing (and caching) the K/V. observers: layers attending over the owner's
    cache (the owner and its kv_from consumers): their window queries score the slots. members: layers whose
    own cache tensors are gathered (the owner, and probs_from consumers, which cache values over the same
    slots). per_head: one selection per (row, KV head); else one per row for all heads.
    """

    owner: int
    observers: list[int]
    members: list[int]
    per_head: bool

    @property
    def key(self) -> tuple:
        return ("pyramid", self.owner)


def cache_groups(layers: list) -> list[CacheGroup]:
    """Cache groups of the global layers of a spec (`layers`: LayerSpec-like objects), ordered by owner.

    Window layers are left out: their ring cache is bounded already.
    """
    def root(i: int) -> int:  # the layer owning the K/V that layer i's slots follow
        layer = layers[i]
        if layer.kv_from is not None:
            return layer.kv_from
        if layer.probs_from is not None:
            return root(layer.probs_from)
        return i

    groups: dict[int, CacheGroup] = {}
    for i, layer in enumerate(layers):
        if layer.is_window:
            continue
        owner = root(i)
        group = groups.setdefault(owner, CacheGroup(owner=owner, observers=[], members=[], per_head=True))
        if layer.probs_from is None:
            group.observers.append(i)
        if layer.kv_from is None:
            group.members.append(i)
    for group in groups.values():
        # Latents have no head axis (slot_dim 1); a probs_from consumer's values must follow its producer's slots
        # whatever its own head count, so both take one selection per row.
        has_probs_consumers = any(layers[m].probs_from is not None for m in group.members)
        has_head_axis = all(tensor.slot_dim == 2 for tensor in layers[group.owner].cached_tensors.values())
        group.per_head = has_head_axis and not has_probs_consumers
    return [groups[k] for k in sorted(groups)]


# ================================================================================================
# The cache-side state
# ================================================================================================


class PyramidKV:
    """PyramidKV for one KVForgeCache: scores during the prefill, compacts after it, then routes each layer
    to its group's (smaller) slot layout.

    Budgets are per cache group: with kv_from sharing a group is one cache for several layers, and the
    schedule runs over the groups from bottom to top.
    """

    def __init__(self, settings: PyramidSettings, layers: list):
        self.settings = settings
        self.groups = cache_groups(layers)
        if not self.groups:
            raise PyramidError("PyramidKV needs at least one global attention layer; every layer of this model "
                               "uses a sliding window, whose cache is bounded already")
        self.budgets = dict(zip((g.owner for g in self.groups), layer_budgets(settings, len(self.groups))))
        self._group_of = {i: g for g in self.groups for i in g.observers + g.members}
        self._scores: dict[int, torch.Tensor] = {}  # owner -> [B, K, S] summed window attention
        self.compacted = False
        self.kept: dict[int, int] = {}  # owner -> slots kept per row after compaction (for reports)
        # The compacted groups' plans for the forward in flight (made by plan_for, committed by finish_step).
        self.step_plans: dict[tuple, Any] = {}
        self.step_positions: Optional[torch.Tensor] = None

    # ---- prefill -------------------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        return not self.compacted

    def wants(self, layer_idx: int) -> bool:
        group = self._group_of.get(layer_idx)
        return self.observing and group is not None and layer_idx in group.observers

    def observe_layer(self, module, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan, shared) -> None:
        """Scores the prompt's slots by the attention of the last `window` queries of one layer.

        module: the KVForgeAttention; query [B, H, T', D] unrotated (as the layer attends) and cos, sin [B, T', D]
        for the last T' <= T new tokens (at least the window's); plan: the step's SlotPlan (all T queries);
        shared: the SharedKV the layer attends over (all S slots).
        """
        window = min(self.settings.window, query.shape[2])
        window_plan = replace(plan, query_index=plan.query_index[:, -window:],
                              built_mask=plan.mask[..., -window:, :])
        _, probs = module.attend(shared, query[:, :, -window:], cos[:, -window:], sin[:, -window:], window_plan,
                                  True, 0.0)  # probs [B, K, G, w, S]
        scores = probs.float().sum(dim=(2, 3))  # [B, K, S]
        owner = self._group_of[module.layer_idx].owner
        self._scores[owner] = scores if owner not in self._scores else self._scores[owner] + scores

    # ---- compaction ----------------------------------------------------------------------------------
    def plan_for(self, layer_idx: int, base_plan, storage):
        """The SlotPlan layer `layer_idx` attends with: `base_plan` (its layout's, for this forward) until the
        prefill is compacted, then its group's plan over the kept slots (one per group and forward)."""
        group = self._group_of.get(layer_idx)
        if not self.compacted or group is None or group.owner not in self.kept:
            return base_plan
        if group.key not in self.step_plans:  # the first layer of this group in this forward plans it
            length = base_plan.query_index.shape[1]
            self.step_positions = base_plan.key_positions[:, -length:]
            plan = storage.layout.plan(base_plan.query_index, self.step_positions)
            plan.rotary = base_plan.rotary
            self.step_plans[group.key] = plan
        return self.step_plans[group.key]

    def finish_step(self, cache) -> None:
        """Called once a forward's own layouts are committed: commits the groups' plans; after the first
        forward (the prefill), compacts."""
        for key, plan in self.step_plans.items():
            cache.layouts[key].commit(plan, self.step_positions)
        self.step_plans.clear()
        if not self.compacted:
            self.compact(cache)

    @torch.no_grad()
    def compact(self, cache) -> None:
        """Gathers every group's kept slots into smaller tensors and gives the group its own slot layout."""
        layout_cls = type(next(iter(cache.layouts.values())))
        base = cache.layouts[(None, 0)]
        slots_now = base.length
        reserve = max(0, base.max_cache_len - slots_now) if base.max_cache_len else 0
        key_index = base.token_index[:, :slots_now]  # [B, S]
        s = self.settings
        for group in self.groups:
            keep = self.budgets[group.owner]
            if slots_now <= keep:
                continue  # the prompt fits in this group's budget: nothing to drop
            if group.owner not in self._scores:
                raise PyramidError(f"layer {group.owner} was not scored during the prefill; the modeling code must "
                                   "call PyramidKV.observe_layer from every attention layer")
            scores = self._scores[group.owner][..., :slots_now]  # [B, K, S]
            if not group.per_head:
                scores = scores.sum(dim=1, keepdim=True)
            scores = pool_scores(scores, s.pooling, s.kernel_size)
            slots = select_tokens(scores, key_index, keep, window=s.window, sinks=s.sinks)  # [B, X, keep]
            capacity = keep + reserve
            for member in group.members:
                storage = cache.layers[member]
                storage.tensors = {name: gather_slots(t, storage.slot_dims[name], slots, capacity)
                                   for name, t in storage.tensors.items()}
            # Every head of a row keeps the same valid-slot pattern (select_tokens orders padding first), and
            # every kept token precedes any new one, so head 0's token index gives the mask for all heads.
            # Positions matter only to latent caches, whose selection is one per row.
            layout = layout_cls(None, 0, max_cache_len=keep + reserve if reserve else None)
            first = slots[:, 0]  # [B, keep]
            layout.token_index = torch.full((first.shape[0], capacity), -1, dtype=key_index.dtype, device=first.device)
            layout.positions = torch.zeros_like(layout.token_index)
            layout.token_index[:, :keep] = key_index.gather(1, first)
            layout.positions[:, :keep] = base.positions[:, :slots_now].gather(1, first)
            layout.length = keep
            layout.rows_alike = False  # each row keeps its own tokens
            cache.layouts[group.key] = layout
            for member in group.members + group.observers:
                cache.layers[member].layout = layout
            self.kept[group.owner] = keep
        self._scores.clear()
        self.compacted = True

    def report(self) -> dict:
        return {"settings": self.settings.to_dict(), "groups": [g.owner for g in self.groups],
                "budgets": [self.budgets[g.owner] for g in self.groups], "kept": dict(self.kept)}


# ================================================================================================
# A cache with PyramidKV
# ================================================================================================


def _modeling_module(obj):
    """The module that defined obj's class: the package's modeling file or an exported copy of it."""
    return sys.modules[type(obj).__module__]


def new_pyramid_cache(model, settings: Any = None, *, max_cache_len: Optional[int] = None, **overrides: Any):
    """A KVForgeCache for `model` that applies PyramidKV, for `model.generate(..., cache=cache)`.

    settings: PyramidSettings or a mapping; None takes `compression.inference.pyramid` from the model's config.
    overrides: individual settings (budget=..., schedule=...) on top. (A model whose config holds a default
    applies it in a plain generate(); this is for other settings, or for a model without a default.)

    Raises PyramidError when no settings are given and the config has none, or for invalid settings.
    """
    config = model.config
    spec_pyramid = config.compression.get("inference", {}).get("pyramid") if config.compression else None
    if settings is None:
        if spec_pyramid is None and "budget" not in overrides:
            raise PyramidError("no PyramidKV settings: pass settings / budget=..., or export the model with "
                               "compression.inference.pyramid")
        settings = spec_pyramid or {}
    settings = PyramidSettings.from_any(settings, **overrides)
    cache_cls = getattr(_modeling_module(model), "KVForgeCache", None)
    if cache_cls is None:
        raise PyramidError(f"PyramidKV applies to KVForge models; got {type(model).__name__}")
    return cache_cls(config, max_cache_len=max_cache_len, pyramid=settings)


__all__ = ["PyramidSettings", "PyramidError", "PyramidKV", "CacheGroup", "layer_budgets", "pool_scores",
           "select_tokens", "gather_slots", "cache_groups", "new_pyramid_cache"]
