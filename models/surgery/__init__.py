"""Compression surgery: a pretrained Llama / Mistral / Qwen2 model + a CompressionSpec -> KVForgeForCausalLM.

    compress(model, spec, calibration_rows)
      1. resolve   the spec's data-dependent choices, from calibration statistics when needed:
                   ranks under a KV budget (rank_allocation), shared-attention spans (shared_attention)
      2. transform the pretrained state dict into the compressed model's, layer by layer, one method per
                   file: kv_sharing.py, low_rank.py, head_merging.py, shared_attention.py
      3. build     KVForgeForCausalLM(config) and load the new state dict, after asserting that the two
                   agree key for key and shape for shape (nothing missing, nothing unexpected)

Everything outside the attention projections (embeddings, norms, MLPs, lm_head) is copied bit for bit.
Calibration statistics (`calibration.CalibrationStatistics`) are collected only if the spec or the
settings need them: dense layouts (MixAttention windows/sharing with kv_sharing_init="producer", named
shared-attention spans) need none.

The entry point the trainer uses is `build_compressed_model(base_model, spec_dict_or_preset,
calibration_rows, settings=...)`; `launch/compress.py` is the command line around it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers.initialization import no_init_weights

from kvforge.suggest import did_you_mean

from ..calibration import CalibrationStatistics, collect_statistics
from ..configuration_kvforge import (
    CompressionSpec, Geometry, KVForgeConfig, dtype_num_bytes, layer_slot_fraction, original_kv_bytes_per_token,
)
from . import head_merging, kv_sharing, low_rank, rank_allocation, shared_attention
from .linalg import discarded_energy, pair_energy, rank_for_energy


RANK_ALLOCATIONS = ("as_given", "greedy", "energy")


class SurgeryError(ValueError):
    """A spec, settings or model that surgery cannot work with; the message names the value and the fix."""


@dataclass
class SurgerySettings:
    """How the compressed weights are initialised (the spec says *what* the model is; this says *how*).

    kv_sharing_init: "producer" keeps a shared cache's producer projections; "average" averages the
        group's K/V projections into the producer (kv_sharing.py).
    rank_allocation: low-rank ranks "as_given" in the spec; "greedy" re-spends a budget over all low-rank
        matrices by discarded eigen-energy per byte (rank_allocation.py); "energy" picks per matrix the
        smallest rank keeping `energy_threshold` of the energy.
    budget_fraction / budget_bytes_per_token: the KV budget for "greedy" (at most one; default: the spec's
        own total, i.e. redistribute its ranks). Counted in `cache_dtype` at `context_tokens` tokens
        (window layers cost (window + sinks) / context_tokens of a global one; None: they cost nothing).
    budget_normalization: "relative" (each matrix's error as a fraction of its energy) or "absolute".
    rope_pair_criterion: which rotary pairs a partial-RoPE layer keeps (low_rank.ROPE_PAIR_CRITERIA).
    balance: weighting of the low-rank PCA (low_rank.BALANCES).
    init: how low-rank latents are initialised (low_rank.INITS). "pca" reconstructs K and V (weighted by
        `balance`); "output_aware" minimises the logit error the key error causes (weighted by the queries'
        second moment, averaged over RoPE lags of `context_tokens`, or the calibration row length when that
        is None) and the o_proj output error the value error causes, summed over every layer that reads the
        cache (kv_from consumers included); "output_aware_values" (the default: the lowest perplexity after
        surgery on SmolLM2 at 25% and 50% of the cache, docs/COMPRESSION.md) does so for values only, keys by
        the PCA.
        The output-aware parts replace `balance`; partial-RoPE joint latents and merged heads keep
        following it (the report says which init each layer got). The greedy rank allocation spends the
        budget on the spectra of the same objectives (under "output_aware" with relative normalisation:
        keys and values of a layer in its output units, layers relative to their value energy).
    shared_attention: None (spans as in the spec), or {"count": n} / {"threshold": t} to choose spans from
        calibration attention maps (shared_attention.py).
    calibration_batch_size, attention_rows, attention_metric: passed to `calibration.collect_statistics`.
    """

    kv_sharing_init: str = "producer"
    rank_allocation: str = "as_given"
    energy_threshold: float = 0.99
    budget_fraction: Optional[float] = None
    budget_bytes_per_token: Optional[float] = None
    budget_normalization: str = "relative"
    cache_dtype: str = "bfloat16"
    context_tokens: Optional[int] = 2048
    rope_pair_criterion: str = "norm"
    balance: str = "none"
    init: str = "output_aware_values"
    shared_attention: Optional[dict[str, Any]] = None
    calibration_batch_size: int = 4
    # Where calibration's forward passes run: auto (a GPU when there is one), cpu, cuda, cuda:N.
    calibration_device: str = "auto"
    attention_rows: int = 8
    attention_metric: str = "js"
    show_progress: bool = True

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "SurgerySettings":
        data = dict(data or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            hint = "; ".join(f"{k!r}{did_you_mean(k, names, paren=True)}" for k in unknown)
            raise SurgeryError(f"unknown surgery settings {hint}; known: {names}")
        settings = cls(**data)
        settings.validate()
        return settings

    def resolved_calibration_device(self) -> Optional[str]:
        """calibration_device with auto resolved: a GPU when there is one, else None (where the model is)."""
        if self.calibration_device == "auto":
            return "cuda" if torch.cuda.is_available() else None
        return self.calibration_device

    def validate(self) -> None:
        def choice(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                raise SurgeryError(f"surgery.{name}={getattr(self, name)!r} is not one of {allowed}")

        choice("kv_sharing_init", kv_sharing.KV_SHARING_INITS)
        choice("rank_allocation", RANK_ALLOCATIONS)
        choice("budget_normalization", rank_allocation.NORMALIZATIONS)
        choice("rope_pair_criterion", low_rank.ROPE_PAIR_CRITERIA)
        choice("balance", low_rank.BALANCES)
        choice("init", low_rank.INITS)
        if not 0 < self.energy_threshold <= 1:
            raise SurgeryError(f"surgery.energy_threshold must be in (0, 1], got {self.energy_threshold}")
        if self.budget_fraction is not None and self.budget_bytes_per_token is not None:
            raise SurgeryError("set at most one of surgery.budget_fraction and surgery.budget_bytes_per_token")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise SurgeryError(f"surgery.budget_fraction must be in (0, 1] (of the original KV cache), got {self.budget_fraction}")
        if self.budget_bytes_per_token is not None and not self.budget_bytes_per_token > 0:
            raise SurgeryError(f"surgery.budget_bytes_per_token must be > 0, got {self.budget_bytes_per_token}")
        has_budget = self.budget_fraction is not None or self.budget_bytes_per_token is not None
        if has_budget and self.rank_allocation != "greedy":
            raise SurgeryError(f"a KV budget needs surgery.rank_allocation='greedy', got {self.rank_allocation!r}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise SurgeryError(f"surgery.context_tokens must be >= 1 or null, got {self.context_tokens}")
        if self.calibration_device != "auto":
            try:
                torch.device(self.calibration_device)
            except (RuntimeError, TypeError):
                raise SurgeryError(f"surgery.calibration_device={self.calibration_device!r} is not a device; expected "
                                   "auto, cpu, cuda or cuda:N") from None
        try:
            dtype_num_bytes(self.cache_dtype)
        except ValueError as e:
            raise SurgeryError(f"surgery.cache_dtype: {e}") from None
        if self.shared_attention is not None:
            keys = set(self.shared_attention)
            if len(keys & {"count", "threshold"}) != 1 or keys - {"count", "threshold"}:
                raise SurgeryError(f"surgery.shared_attention must be {{'count': n}} or {{'threshold': t}}, "
                                   f"got {self.shared_attention!r}")

    def needs_attention_maps(self) -> bool:
        return self.shared_attention is not None


# ---------------------------------------------------------------------------------------------------
# Model facts


def _attention_prefix(layer: int) -> str:
    return f"model.layers.{layer}.self_attn."


# ---------------------------------------------------------------------------------------------------
# Step 1: resolve the data-dependent parts of the spec


def needs_statistics(spec: CompressionSpec, settings: SurgerySettings) -> bool:
    """Calibration is needed for low-rank or merged layers and for choosing shared-attention spans."""
    return settings.needs_attention_maps() or any(l.kv_proj in ("low_rank", "merged_heads") for l in spec.layers)


def spec_kv_bytes_per_token(spec: CompressionSpec, geometry: Geometry, settings: SurgerySettings) -> float:
    """The spec's KV bytes per token at settings.context_tokens (None: the long-context rate)."""
    return spec.kv_cache_bytes_per_token(num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
                                         dtype=settings.cache_dtype, num_tokens=settings.context_tokens)


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
            probs_from = shared_attention.spans_by_count(stats.attention_divergence, how["count"], can_share)
        else:
            probs_from = shared_attention.spans_by_threshold(stats.attention_divergence, how["threshold"], can_share)
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
            layer.v_rank = v_rank
    return new


# ---------------------------------------------------------------------------------------------------
# Low-rank plans: the PCA problem of every low-rank matrix, solved once at full rank


@dataclass
class LowRankProblem:
    """One matrix to factorise: (layer, part) with part "k", "v" (pre_rope_latent / value latent) or "kv"
    (partial RoPE's joint latent); `spectrum` is what the chosen factorisation leaves out beyond a rank."""

    layer: int
    part: str
    spectrum: torch.Tensor
    max_rank: int


def _restore_value_mean(expected: Mapping[str, torch.Size], layer: int) -> bool:
    # Values are centred only when the module has a v_up bias to add the mean back (see linalg.factorize).
    return f"{_attention_prefix(layer)}v_up.bias" in expected


def _has_kv_down_bias(expected: Mapping[str, torch.Size], layer: int) -> bool:
    # The non-rotary keys' mean can only be subtracted (and dropped) through a bias on kv_down.
    return f"{_attention_prefix(layer)}kv_down.bias" in expected


def _kv_moments(stats: CalibrationStatistics, layer: int, attn: "DenseAttention"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the concatenated pre-RoPE [k; v] of `layer` with its (effective) projections."""
    weight = torch.cat([attn.k_weight, attn.v_weight])
    bias = None
    if attn.k_bias is not None or attn.v_bias is not None:
        bias = torch.cat([attn.k_bias if attn.k_bias is not None else torch.zeros(attn.k_weight.shape[0]),
                          attn.v_bias if attn.v_bias is not None else torch.zeros(attn.v_weight.shape[0])])
    return stats.output_moments(layer, weight, bias)


def _q_pair_energy(stats: CalibrationStatistics, layer: int, attn: "DenseAttention", geometry: Geometry) -> torch.Tensor:
    second, _ = stats.output_moments(layer, attn.q_weight, attn.q_bias)
    return pair_energy(second, geometry.num_heads, geometry.head_dim)


def _key_scale(stats, layer, attn, geometry, settings) -> Optional[torch.Tensor]:
    if settings.balance != "attention":
        return None
    return low_rank.key_pair_scale(_q_pair_energy(stats, layer, attn, geometry), geometry.num_kv_heads).flatten()


def _value_scale(attn, geometry, settings) -> Optional[torch.Tensor]:
    if settings.balance != "attention":
        return None
    return low_rank.value_dim_scale(attn.o_weight, geometry.num_kv_heads, geometry.head_dim).flatten()


def _output_metric(stats: CalibrationStatistics, spec: CompressionSpec, attn: list["DenseAttention"], layer: int,
                   part: str, geometry: Geometry, settings: SurgerySettings, rope_inv_freq: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
    """The output-aware metric of `layer`'s key ("k") or value ("v") latent, or None where the init is the PCA
    (init="pca"; keys under init="output_aware_values").

    Every layer that attends over this layer's cache adds its own term (its queries for keys, its o_proj for
    values): the layer itself and its kv_from consumers, each with its own input statistics.
    """
    if settings.init == "pca" or (part == "k" and settings.init == "output_aware_values"):
        return None
    readers = [layer] + [c for c, l in enumerate(spec.layers) if l.kv_from == layer]
    if part == "v":
        return sum(low_rank.value_output_metric(attn[r].o_weight, geometry.num_kv_heads, geometry.head_dim)
                   for r in readers)
    if rope_inv_freq is None:
        raise SurgeryError("surgery.init='output_aware' needs the model's RoPE frequencies for the key metric "
                           "(compress reads them from model.model.rotary_emb.inv_freq)")
    context = settings.context_tokens or stats.seq_len
    kv_second, kv_mean = _kv_moments(stats, layer, attn[layer])
    n = geometry.kv_dims
    metric = 0
    for r in readers:
        q_second, _ = stats.output_moments(r, attn[r].q_weight, attn[r].q_bias)
        # Logit units -> output units (low_rank.value_spread), so keys and values share the greedy's currency.
        # One rate per reading layer (the mean over its query heads): a scalar leaves the key directions as the
        # logit metric chooses them (per-head rates gave worse layer outputs on SmolLM2), it only prices them.
        rate = low_rank.value_spread(attn[r].o_weight, kv_second[n:, n:], kv_mean[n:], geometry.num_kv_heads,
                                     geometry.head_dim).mean()
        metric = metric + rate * low_rank.key_output_metric(q_second, geometry.num_kv_heads, geometry.head_dim,
                                                            rope_inv_freq, context)
    return metric


def _pre_rope(stats, layer, attn, geometry, settings, part: str, rank: int, restore_mean: bool,
              metric: Optional[torch.Tensor] = None):
    # An output-aware metric replaces the diagonal `balance` weighting (it contains it as its rotation average).
    kv_second, kv_mean = _kv_moments(stats, layer, attn)
    n = geometry.kv_dims
    if part == "k":
        return low_rank.pre_rope_factors(weight=attn.k_weight, bias=attn.k_bias, second_moment=kv_second[:n, :n],
                                         mean=kv_mean[:n], rank=rank, restore_mean=False, metric=metric,
                                         scale=None if metric is not None else _key_scale(stats, layer, attn, geometry, settings))
    return low_rank.pre_rope_factors(weight=attn.v_weight, bias=attn.v_bias, second_moment=kv_second[n:, n:],
                                     mean=kv_mean[n:], rank=rank, restore_mean=restore_mean, metric=metric,
                                     scale=None if metric is not None else _value_scale(attn, geometry, settings))


def _partial(stats, layer, attn, geometry, settings, rope_dims: int, rank: int, restore_mean: bool,
             drop_key_mean: bool):
    kv_second, kv_mean = _kv_moments(stats, layer, attn)
    return low_rank.partial_rope_factors(
        k_weight=attn.k_weight, k_bias=attn.k_bias, v_weight=attn.v_weight, v_bias=attn.v_bias,
        kv_second_moment=kv_second, kv_mean=kv_mean, q_pair_energy=_q_pair_energy(stats, layer, attn, geometry),
        num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim, rope_dims=rope_dims, kv_rank=rank,
        criterion=settings.rope_pair_criterion, restore_value_mean=restore_mean, drop_key_mean=drop_key_mean,
        balance=settings.balance, o_weight=attn.o_weight)


def low_rank_problems(spec: CompressionSpec, stats: CalibrationStatistics, attn: list["DenseAttention"],
                      geometry: Geometry, settings: SurgerySettings, expected: Mapping[str, torch.Size],
                      rope_inv_freq: Optional[torch.Tensor] = None) -> list[LowRankProblem]:
    """The spectrum of every low-rank matrix of the spec, as the transform will factorise it (under the
    output-aware init, the spectrum of the weighted problem: the greedy then spends ranks on that objective)."""
    problems = []
    for i, layer in enumerate(spec.layers):
        if layer.kv_proj != "low_rank" or layer.kv_from is not None:
            continue
        restore = _restore_value_mean(expected, i)
        if layer.probs_from is not None:
            f = _pre_rope(stats, i, attn[i], geometry, settings, "v", 1, restore,
                          _output_metric(stats, spec, attn, i, "v", geometry, settings, rope_inv_freq))
            problems.append(LowRankProblem(i, "v", f.eigenvalues, geometry.kv_dims))
        elif layer.rope == "pre_rope_latent":
            for part in ("k", "v"):
                f = _pre_rope(stats, i, attn[i], geometry, settings, part, 1, restore,
                              _output_metric(stats, spec, attn, i, part, geometry, settings, rope_inv_freq))
                problems.append(LowRankProblem(i, part, f.eigenvalues, geometry.kv_dims))
        else:
            f = _partial(stats, i, attn[i], geometry, settings, layer.rope_dims, 1, restore, _has_kv_down_bias(expected, i))
            problems.append(LowRankProblem(i, "kv", f.latent.eigenvalues, f.latent.up_weight.shape[0]))
    return problems


_RANK_FIELD = {"k": "k_rank", "v": "v_rank", "kv": "kv_rank"}


def resolve_ranks(spec: CompressionSpec, problems: list[LowRankProblem], geometry: Geometry,
                  settings: SurgerySettings) -> CompressionSpec:
    """A copy of `spec` with low-rank ranks chosen by settings.rank_allocation (as_given: unchanged).

    greedy: the budget (settings, or the spec's own total) minus what every non-latent part of the cache
    costs is spent on latent directions by rank_allocation.allocate_ranks.

    Raises:
        SurgeryError: a budget below what the fixed parts of the cache (dense layers, rotary dims) and one
            rank per latent already cost.
    """
    if settings.rank_allocation == "as_given" or not problems:
        return spec
    new = copy.deepcopy(spec)
    if settings.rank_allocation == "energy":
        for p in problems:
            setattr(new.layers[p.layer], _RANK_FIELD[p.part], min(p.max_rank, rank_for_energy(p.spectrum, settings.energy_threshold)))
        return new
    bytes_per_element = dtype_num_bytes(settings.cache_dtype)
    fractions = [layer_slot_fraction(l, settings.context_tokens) for l in spec.layers]
    # Each latent direction of a layer costs one element per token times the layer's slot fraction. Window
    # layers with context_tokens=None cost nothing; a tiny cost keeps the greedy well defined (they fill first).
    costs = {(p.layer, p.part): max(fractions[p.layer], 1e-9) for p in problems}
    latent_now = sum(getattr(spec.layers[p.layer], _RANK_FIELD[p.part]) * costs[(p.layer, p.part)] for p in problems)
    total_now = sum(l.kv_cache_elements_per_token(geometry.num_kv_heads, geometry.head_dim) * f
                    for l, f in zip(spec.layers, fractions))
    fixed = total_now - latent_now
    if settings.budget_fraction is not None:
        target = settings.budget_fraction * original_kv_bytes_per_token(geometry, settings.cache_dtype) / bytes_per_element
        what = f"budget_fraction={settings.budget_fraction} of {original_kv_bytes_per_token(geometry, settings.cache_dtype)} bytes/token"
    elif settings.budget_bytes_per_token is not None:
        target = settings.budget_bytes_per_token / bytes_per_element
        what = f"budget_bytes_per_token={settings.budget_bytes_per_token}"
    else:
        target, what = total_now, "the spec's own total"
    # Budgets in elements are integers for global layers: round away float noise (e.g. 0.5 * 23040 / 2).
    latent_budget = math.floor(target - fixed + 1e-6)
    normalization, weights = settings.budget_normalization, {(p.layer, p.part): 1.0 for p in problems}
    if settings.init == "output_aware" and normalization == "relative":
        # A layer's key and value spectra are both in units of its attention-output error (low_rank.value_spread),
        # so they compete as they are; layers compete relative to their value energy (the weighted trace of
        # the value spectrum): the same "fraction of what the layer carries" as the PCA's relative budget.
        energy = {p.layer: float(p.spectrum.sum()) for p in problems if p.part in ("v", "kv")}
        weights = {(p.layer, p.part): 1.0 / energy[p.layer] if energy[p.layer] > 0 else 1.0 for p in problems}
        normalization = "absolute"
    candidates = [rank_allocation.RankCandidate(key=(p.layer, p.part), eigenvalues=p.spectrum,
                                                cost=costs[(p.layer, p.part)], max_rank=p.max_rank,
                                                weight=weights[(p.layer, p.part)])
                  for p in problems]
    try:
        ranks = rank_allocation.allocate_ranks(candidates, latent_budget, normalization=normalization)
    except rank_allocation.BudgetError as e:
        raise SurgeryError(
            f"the KV budget ({what}) leaves {latent_budget} elements/token for low-rank latents after "
            f"{fixed:g} for the rest of the cache, too little: {e}") from None
    for (layer, part), rank in ranks.items():
        setattr(new.layers[layer], _RANK_FIELD[part], rank)
    return new


# ---------------------------------------------------------------------------------------------------
# Per-layer effective dense projections (after kv-sharing initialisation)


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
    p = _attention_prefix(layer)
    missing = [f"{p}{n}_proj.weight" for n in "qkvo" if f"{p}{n}_proj.weight" not in state]
    if missing:
        raise SurgeryError(f"the pretrained state dict lacks {missing}; surgery expects a Llama/Mistral/Qwen2 model")
    return DenseAttention(*[t for n in "qkvo" for t in (state[f"{p}{n}_proj.weight"], state.get(f"{p}{n}_proj.bias"))])


def effective_attention(state: Mapping[str, torch.Tensor], spec: CompressionSpec, settings: SurgerySettings
                        ) -> list[DenseAttention]:
    """Every layer's dense projections, with shared-cache producers averaged when kv_sharing_init='average'."""
    layers = [dense_attention(state, i) for i in range(len(spec.layers))]
    if settings.kv_sharing_init == "average":
        for producer, group in kv_sharing.sharing_groups([l.kv_from for l in spec.layers]).items():
            lp = layers[producer]
            lp.k_weight, lp.k_bias = kv_sharing.averaged_projection([layers[i].k_weight for i in group],
                                                                   [layers[i].k_bias for i in group])
            lp.v_weight, lp.v_bias = kv_sharing.averaged_projection([layers[i].v_weight for i in group],
                                                                   [layers[i].v_bias for i in group])
    return layers


# ---------------------------------------------------------------------------------------------------
# Step 2: transform the state dict


def transform_state_dict(
    state: Mapping[str, torch.Tensor], spec: CompressionSpec, geometry: Geometry,
    stats: Optional[CalibrationStatistics], settings: SurgerySettings, expected: Mapping[str, torch.Size],
    rope_inv_freq: Optional[torch.Tensor] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed model's state dict from the pretrained one, and a per-layer report.

    Non-attention tensors are the very same tensors (bit-identical); attention tensors follow each
    layer's spec. `expected` (name -> shape of the target module's state) decides only optional biases
    (v_up.bias) and is asserted against afterwards in `load_checked`. `rope_inv_freq` [d/2] (the model's RoPE
    frequencies) is needed by init="output_aware" for pre-RoPE key latents.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".self_attn." not in key:
            out[key] = tensor
    attn = effective_attention(state, spec, settings)
    report: dict[str, Any] = {"layers": []}
    # A merged-heads producer's fold (key coefficients, value rebuild maps) applies to the queries and o_proj
    # of every layer that attends over its cache, its kv_from consumers included.
    merged_folds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(spec.layers):
        p = _attention_prefix(i)
        a = attn[i]
        entry: dict[str, Any] = {"layer": i}

        def put(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
            out[f"{p}{name}.weight"] = weight.contiguous()
            if bias is not None:
                out[f"{p}{name}.bias"] = bias.contiguous()

        computes_probs = layer.probs_from is None
        if computes_probs:
            put("q_proj", a.q_weight, a.q_bias)
        put("o_proj", a.o_weight, a.o_bias)
        if layer.kv_from is not None:
            entry["kv"] = f"reads layer {layer.kv_from}"
            if layer.kv_from in merged_folds:
                coefficients, rebuild = merged_folds[layer.kv_from]
                q_w, q_b = head_merging.fold_keys_into_q_proj(a.q_weight, a.q_bias, coefficients, geometry.head_dim)
                put("q_proj", q_w, q_b)
                put("o_proj", head_merging.fold_values_into_o_proj(a.o_weight, rebuild), a.o_bias)
                entry["kv"] += " (merged heads folded into q_proj / o_proj)"
        elif layer.kv_proj == "dense":
            if computes_probs:
                put("k_proj", a.k_weight, a.k_bias)
            put("v_proj", a.v_weight, a.v_bias)
            entry["kv"] = "dense"
        elif layer.kv_proj == "merged_heads":
            groups = head_merging.head_groups(geometry.num_heads, geometry.num_kv_heads, layer.num_kv_heads)
            kv_second, _ = _kv_moments(stats, i, a)
            n = geometry.kv_dims
            weighted = settings.balance == "attention"
            v_w, v_b, rebuild = head_merging.merge_values(a.v_weight, a.v_bias, kv_second[n:, n:], groups, geometry.head_dim,
                                                          o_weight=a.o_weight if weighted else None)
            put("v_proj", v_w, v_b)
            put("o_proj", head_merging.fold_values_into_o_proj(a.o_weight, rebuild), a.o_bias)
            if computes_probs:
                k_w, k_b, coefficients = head_merging.merge_keys(
                    a.k_weight, a.k_bias, kv_second[:n, :n], groups, geometry.head_dim,
                    q_pair_energy=_q_pair_energy(stats, i, a, geometry) if weighted else None)
                put("k_proj", k_w, k_b)
                q_w, q_b = head_merging.fold_keys_into_q_proj(a.q_weight, a.q_bias, coefficients, geometry.head_dim)
                put("q_proj", q_w, q_b)
                merged_folds[i] = (coefficients, rebuild)
            entry["kv"] = f"merged {geometry.num_kv_heads} -> {layer.num_kv_heads} heads"
        else:  # low_rank
            restore = _restore_value_mean(expected, i)
            if not computes_probs:
                f = _pre_rope(stats, i, a, geometry, settings, "v", layer.v_rank, restore,
                              _output_metric(stats, spec, attn, i, "v", geometry, settings, rope_inv_freq))
                put("v_down", f.down_weight, f.down_bias)
                put("v_up", f.up_weight, f.up_bias)
                entry["kv"] = f"v latent {layer.v_rank}"
                entry["init"] = settings.init
                entry["v_discarded"] = discarded_energy(f.eigenvalues, layer.v_rank)
            elif layer.rope == "pre_rope_latent":
                fk = _pre_rope(stats, i, a, geometry, settings, "k", layer.k_rank, restore,
                               _output_metric(stats, spec, attn, i, "k", geometry, settings, rope_inv_freq))
                fv = _pre_rope(stats, i, a, geometry, settings, "v", layer.v_rank, restore,
                               _output_metric(stats, spec, attn, i, "v", geometry, settings, rope_inv_freq))
                put("k_down", fk.down_weight, fk.down_bias)
                put("k_up", fk.up_weight, fk.up_bias)
                put("v_down", fv.down_weight, fv.down_bias)
                put("v_up", fv.up_weight, fv.up_bias)
                entry["kv"] = f"pre-RoPE latents k {layer.k_rank} v {layer.v_rank}"
                entry["init"] = settings.init
                entry["k_discarded"] = discarded_energy(fk.eigenvalues, layer.k_rank)
                entry["v_discarded"] = discarded_energy(fv.eigenvalues, layer.v_rank)
            else:
                f = _partial(stats, i, a, geometry, settings, layer.rope_dims, layer.kv_rank, restore,
                             _has_kv_down_bias(expected, i))
                put("k_rope", f.k_rope_weight, f.k_rope_bias)
                put("kv_down", f.latent.down_weight, f.latent.down_bias)
                put("k_up", f.k_up_weight)
                put("v_up", f.v_up_weight, f.v_up_bias)
                out[f"{p}rope_index"] = f.rope_pairs
                entry["kv"] = f"partial RoPE {layer.rope_dims} dims + latent {layer.kv_rank}"
                entry["init"] = "pca"  # init="output_aware" covers pre-RoPE and value latents only (low_rank.py)
                entry["kv_discarded"] = discarded_energy(f.latent.eigenvalues, layer.kv_rank)
                entry["rope_pairs"] = f.rope_pairs.tolist()
        if layer.probs_from is not None:
            entry["probs"] = f"reuses layer {layer.probs_from}"
        report["layers"].append(entry)
    return out, report


# ---------------------------------------------------------------------------------------------------
# Step 3: build the module and load, with loud key and shape checks


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` into `model` after asserting identical key sets and shapes.

    Raises:
        SurgeryError: listing every missing key, unexpected key and shape mismatch.
    """
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = [f"{k}: built {tuple(target[k].shape)}, surgery produced {tuple(state[k].shape)}"
                  for k in sorted(set(target) & set(state)) if target[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise SurgeryError(
            "the compressed state dict does not match the module built from the spec:\n"
            + (f"  missing ({len(missing)}): {missing[:12]}\n" if missing else "")
            + (f"  unexpected ({len(unexpected)}): {unexpected[:12]}\n" if unexpected else "")
            + (f"  shape mismatches ({len(mismatched)}): {mismatched[:12]}\n" if mismatched else "")
        )
    with torch.no_grad():
        for key, value in target.items():
            value.copy_(state[key].to(value.dtype))


# ---------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class SurgeryResult:
    """What `compress` returns: the model, the resolved spec it was built from, a per-layer report and the
    calibration statistics (None when the spec needed none)."""

    model: nn.Module
    spec: CompressionSpec
    report: dict[str, Any]
    statistics: Optional[CalibrationStatistics]


def _rope_inv_freq(model: nn.Module) -> Optional[torch.Tensor]:
    """[d/2] float64: the RoPE frequencies theta_f the pretrained model itself rotates with (its rotary
    embedding's inv_freq, so scaled RoPE types are as the model has them), or None if it has no such module."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    return None if inv_freq is None else inv_freq.detach().to(torch.float64).cpu()


def _expected_state(config: KVForgeConfig) -> dict[str, torch.Size]:
    """Key -> shape of the state dict of KVForgeForCausalLM(config), without allocating its weights."""
    from ..modeling_kvforge import KVForgeForCausalLM

    with torch.device("meta"):
        skeleton = KVForgeForCausalLM(config)
    return {k: v.shape for k, v in skeleton.state_dict().items()}


def compress(
    model: nn.Module,
    spec: CompressionSpec | Mapping[str, Any],
    calibration_rows: Optional[torch.Tensor] = None,
    *,
    settings: Optional[SurgerySettings | Mapping[str, Any]] = None,
    statistics: Optional[CalibrationStatistics] = None,
) -> SurgeryResult:
    """Pretrained Llama / Mistral / Qwen2 model + spec -> KVForgeForCausalLM (see the module doc).

    Args:
        model: the pretrained HF causal LM (left unchanged).
        spec: a CompressionSpec or its dict form (one LayerSpec per layer).
        calibration_rows: [N, S] token ids of real text, needed when the spec/settings need statistics and
            `statistics` is not given.
        settings: SurgerySettings or its dict form.
        statistics: precomputed calibration statistics of this model (e.g. cached by launch/compress.py).

    Raises:
        SurgeryError / CompressionSpecError: an invalid spec or settings, missing calibration data, a
            budget that cannot be met, or a state dict that does not match the built module.
    """
    from ..modeling_kvforge import KVForgeForCausalLM

    settings = settings if isinstance(settings, SurgerySettings) else SurgerySettings.from_dict(settings)
    settings.validate()
    geometry = Geometry.of(model.config)
    spec = spec if isinstance(spec, CompressionSpec) else CompressionSpec.from_dict(dict(spec))
    spec.validate(geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim)

    # ---- statistics, only if something needs them
    if needs_statistics(spec, settings) and statistics is None:
        if calibration_rows is None:
            raise SurgeryError("this spec needs calibration statistics (low-rank or merged layers, or shared-attention "
                               "spans chosen from data): pass calibration_rows [N, seq_len] of real text")
        statistics = collect_statistics(
            model, calibration_rows, batch_size=settings.calibration_batch_size,
            attention_rows=min(settings.attention_rows, calibration_rows.shape[0]) if settings.needs_attention_maps() else 0,
            attention_metric=settings.attention_metric, show_progress=settings.show_progress,
            device=settings.resolved_calibration_device())
    if statistics is not None and (statistics.num_layers != geometry.num_layers or statistics.hidden_size != geometry.hidden_size):
        raise SurgeryError(f"the calibration statistics are of a model with {statistics.num_layers} layers of width "
                           f"{statistics.hidden_size}, this one has {geometry.num_layers} of {geometry.hidden_size}")

    # ---- step 1: resolve data-dependent choices
    state = {k: v.detach() for k, v in model.state_dict().items()}
    rope_inv_freq = _rope_inv_freq(model)
    if settings.shared_attention is not None:
        spec = choose_shared_attention(spec, statistics, geometry, settings)
        spec.validate(geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim)
    config = KVForgeConfig.from_base_config(model.config, spec)
    expected = _expected_state(config)
    if settings.rank_allocation != "as_given":
        attn = effective_attention(state, spec, settings)
        problems = low_rank_problems(spec, statistics, attn, geometry, settings, expected, rope_inv_freq)
        spec = resolve_ranks(spec, problems, geometry, settings)
        spec.validate(geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim)
        config = KVForgeConfig.from_base_config(model.config, spec)
        expected = _expected_state(config)

    # ---- step 2: transform the state dict
    new_state, report = transform_state_dict(state, spec, geometry, statistics, settings, expected, rope_inv_freq)

    # ---- step 3: build the module and load, asserting keys and shapes
    dtype = next(model.parameters()).dtype
    # Every parameter and persistent buffer is overwritten by load_checked (which asserts the key sets are
    # equal), so random initialisation would be wasted work: minutes for a 7B model.
    with no_init_weights():
        compressed = KVForgeForCausalLM(config).to(dtype)
    compressed.tie_weights()  # skipped together with the initialisation
    if config.tie_word_embeddings and compressed.lm_head.weight is not compressed.model.embed_tokens.weight:
        raise SurgeryError("lm_head is not tied to embed_tokens although tie_word_embeddings=True")
    load_checked(compressed, new_state)
    compressed.eval()
    report.update(
        spec_kv_bytes_per_token=spec_kv_bytes_per_token(spec, geometry, settings),
        original_kv_bytes_per_token=original_kv_bytes_per_token(geometry, settings.cache_dtype),
        cache_dtype=settings.cache_dtype, context_tokens=settings.context_tokens,
        settings=asdict(settings),
    )
    return SurgeryResult(compressed, spec, report, statistics)


COMPRESSION_KEYS = ("preset", "arguments", "layers", "calibration", "inference", "surgery")


def parse_compression(section: Any, model_config: Any) -> tuple[CompressionSpec, SurgerySettings]:
    """The `compression:` config section (or a preset name, or a CompressionSpec) -> (spec, settings).

    Forms:
        "mixattention-ma"                                   a preset name, default arguments
        {preset: low-rank, arguments: {budget: 0.25}, surgery: {...}, calibration: {...}}
        {layers: [...], calibration: {...}, inference: {...}, surgery: {...}}

    Raises:
        SurgeryError / PresetError / CompressionSpecError: unknown keys, both or neither of preset/layers,
            bad arguments or an invalid spec.
    """
    from ..presets import build_preset

    if isinstance(section, CompressionSpec):
        return section, SurgerySettings()
    if isinstance(section, str):
        section = {"preset": section}
    if not isinstance(section, Mapping):
        raise SurgeryError(f"compression must be a preset name or a mapping, got {type(section).__name__}")
    section = dict(section)
    unknown = sorted(set(section) - set(COMPRESSION_KEYS))
    if unknown:
        hint = "; ".join(f"{k!r}{did_you_mean(k, COMPRESSION_KEYS, paren=True)}" for k in unknown)
        raise SurgeryError(f"compression: unknown key(s) {hint}; allowed: {list(COMPRESSION_KEYS)}")
    if ("preset" in section) == ("layers" in section):
        raise SurgeryError("compression needs exactly one of `preset` (a preset name) or `layers` (one entry per layer)")
    settings = SurgerySettings.from_dict(section.get("surgery"))
    if "preset" in section:
        arguments = section.get("arguments") or {}
        if not isinstance(arguments, Mapping):
            raise SurgeryError(f"compression.arguments must be a mapping, got {arguments!r}")
        spec = build_preset(section["preset"], model_config, **dict(arguments))
    else:
        if "arguments" in section:
            raise SurgeryError("compression.arguments goes with compression.preset, not with compression.layers")
        spec = CompressionSpec.from_dict({"layers": section["layers"]})
    if "calibration" in section or "inference" in section:
        extra = CompressionSpec.from_dict({"layers": [], "calibration": section.get("calibration"),
                                           "inference": section.get("inference")})
        spec.calibration, spec.pyramid = extra.calibration, extra.pyramid
    geometry = Geometry.of(model_config)
    spec.validate(geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim)
    return spec, settings


def build_compressed_model(base_model: nn.Module, spec_dict_or_preset: Any,
                           calibration_rows: Optional[torch.Tensor], *,
                           settings: Optional[SurgerySettings | Mapping[str, Any]] = None) -> nn.Module:
    """The trainer's entry point: base model + `compression:` section (or preset name) -> KVForgeForCausalLM.

    `settings` (if given) overrides the section's `surgery:` entries key by key.
    """
    spec, section_settings = parse_compression(spec_dict_or_preset, base_model.config)
    if settings is not None:
        merged = asdict(section_settings)
        merged.update(asdict(settings) if isinstance(settings, SurgerySettings) else dict(settings))
        section_settings = SurgerySettings.from_dict(merged)
    return compress(base_model, spec, calibration_rows, settings=section_settings).model


@torch.no_grad()
def measure_original_kv_bytes(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 4) -> dict[str, Any]:
    """A plain HF model's KV cache after a real greedy generate(): the bytes of its DynamicCache's tensors.

    Returns {"tokens", "total_bytes", "bytes_per_token", "per_layer_bytes_per_token": [L]}, the keys
    `measure_generate_kv_bytes` returns for KVForge models.
    """
    from ..modeling_kvforge import generated_cache

    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=model.config.pad_token_id or 0)
    cache = generated_cache(out)
    per_layer = [layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers]
    tokens = cache.get_seq_length()
    return {"tokens": tokens, "total_bytes": sum(per_layer), "bytes_per_token": sum(per_layer) / tokens,
            "per_layer_bytes_per_token": [b / tokens for b in per_layer]}


@torch.no_grad()
def measure_generate_kv_bytes(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 4) -> dict[str, Any]:
    """Run a real greedy generate() and read the bytes of the cache tensors it allocated.

    Returns {"tokens": positions held, "total_bytes", "bytes_per_token", "per_layer_bytes": [L],
    "per_layer_bytes_per_token": [L], "dtype"} from KVForgeCache's own accounting.
    """
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0)
    from ..modeling_kvforge import generated_cache

    cache = generated_cache(out)  # the KVForgeCache generate() itself created and filled
    per_layer = [0] * model.config.num_hidden_layers
    dtypes = set()
    for layer, _, tensor in cache.named_tensors():
        per_layer[layer] += tensor.numel() * tensor.element_size()
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
    tokens = cache.get_seq_length() * input_ids.shape[0]
    return {"tokens": cache.get_seq_length(), "total_bytes": cache.cache_bytes(),
            "bytes_per_token": cache.kv_bytes_per_token(), "per_layer_bytes": per_layer,
            "per_layer_bytes_per_token": [b / tokens for b in per_layer], "dtype": ",".join(sorted(dtypes))}
