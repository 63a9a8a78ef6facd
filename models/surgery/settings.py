"""How the compressed weights are initialised: `SurgerySettings`, the `surgery:` entries of a
`compression:` section (the spec says *what* the model is; the settings say *how* its weights are made).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch

from kvforge.suggest import did_you_mean

from ..configuration_kvforge import dtype_num_bytes

# What each setting may be; the method files import their own from here (settings.py imports no method file).
KV_SHARING_INITS = ("producer", "average")                  # kv_sharing.py
RANK_ALLOCATIONS = ("as_given", "greedy", "energy")          # rank_allocation.py
NORMALIZATIONS = ("relative", "absolute")                    # rank_allocation.py
ROPE_PAIR_CRITERIA = ("norm", "high", "low", "uniform")      # low_rank.py
BALANCES = ("none", "trace", "attention")                    # low_rank.py
INITS = ("pca", "output_aware", "output_aware_values")       # low_rank.py
LOW_BIT_BALANCES = ("auto", "all", "none")                   # low_rank.balanced_for_rounding


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
        own total, i.e. redistribute its ranks). budget_fraction is a config's one budget knob, which a preset's
        `budget` argument follows (compression_config.py). Counted in `cache_dtype` at `context_tokens` tokens
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
    rank_multiple: what "greedy" and "energy" ranks are multiples of (with the cache format's own step,
        LayerSpec.rank_step): a positive integer, or "auto" (the default) for cached latent rows on 16-byte
        boundaries (configuration_kvforge.aligned_rank_step: 8 in bf16, 16 in int8, 32 in 4 bits), which Triton's
        decode kernel reads vectorised: on an H200, SmolLM2's 25% int8 latents decoded 1.85x faster so; after
        surgery on the CPU they cost 0.3-1.1% perplexity at 25% int8, 12.5% int4 and 50% bf16, 3-7% where key ranks
        are small (docs/results/rank-alignment-cpu). 1: any rank, every byte of the budget spendable. A matrix
        narrower than the step keeps the format's step.
    low_bit_balance: which low-bit layers' latent channels surgery scales to unit RMS before they are rounded
        (low_rank.balanced_for_rounding): "auto" 4-bit layers only, "all", "none". Balanced 4-bit latents start
        closer (SmolLM2 at 12.5%: 48.4 -> 44.1 after surgery), but the scaled parameters train differently: at
        8 bits, where balancing saves nothing, the main job's 12 steps ended at 15.61 balanced against 15.00.
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
    rank_multiple: int | str = "auto"
    low_bit_balance: str = "auto"
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
        for key in data:
            if key not in names:
                hint = did_you_mean(key, names) or f"; known keys: {', '.join(names)}"
                raise SurgeryError(f"compression.surgery.{key}: unknown key{hint}")
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
                raise SurgeryError(f"compression.surgery.{name}={getattr(self, name)!r} is not one of {allowed}")

        choice("kv_sharing_init", KV_SHARING_INITS)
        choice("rank_allocation", RANK_ALLOCATIONS)
        choice("budget_normalization", NORMALIZATIONS)
        choice("rope_pair_criterion", ROPE_PAIR_CRITERIA)
        choice("balance", BALANCES)
        choice("init", INITS)
        choice("low_bit_balance", LOW_BIT_BALANCES)
        multiple = self.rank_multiple
        if multiple != "auto" and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise SurgeryError(f"compression.surgery.rank_multiple={multiple!r} is not 'auto' or a positive integer "
                               "(what low-rank ranks are multiples of; 'auto': 16-byte cache rows)")
        if not 0 < self.energy_threshold <= 1:
            raise SurgeryError(f"compression.surgery.energy_threshold must be in (0, 1], got {self.energy_threshold}")
        if self.budget_fraction is not None and self.budget_bytes_per_token is not None:
            raise SurgeryError("set at most one of compression.surgery.budget_fraction and "
                               "compression.surgery.budget_bytes_per_token")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise SurgeryError(f"compression.surgery.budget_fraction must be in (0, 1] (of the original KV cache), "
                               f"got {self.budget_fraction}")
        if self.budget_bytes_per_token is not None and not self.budget_bytes_per_token > 0:
            raise SurgeryError(f"compression.surgery.budget_bytes_per_token must be > 0, got {self.budget_bytes_per_token}")
        has_budget = self.budget_fraction is not None or self.budget_bytes_per_token is not None
        if has_budget and self.rank_allocation != "greedy":
            raise SurgeryError(f"a KV budget needs compression.surgery.rank_allocation='greedy', got "
                               f"{self.rank_allocation!r} (only a preset with a budget argument, low-rank, meets "
                               "compression.surgery.budget_fraction by itself)")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise SurgeryError(f"compression.surgery.context_tokens must be >= 1 or null, got {self.context_tokens}")
        if self.calibration_device != "auto":
            try:
                torch.device(self.calibration_device)
            except (RuntimeError, TypeError):
                raise SurgeryError(f"compression.surgery.calibration_device={self.calibration_device!r} is not a device; expected "
                                   "auto, cpu, cuda or cuda:N") from None
        try:
            dtype_num_bytes(self.cache_dtype)
        except ValueError as e:
            raise SurgeryError(f"compression.surgery.cache_dtype: {e}") from None
        if self.shared_attention is not None:
            keys = set(self.shared_attention)
            if len(keys & {"count", "threshold"}) != 1 or keys - {"count", "threshold"}:
                raise SurgeryError(f"compression.surgery.shared_attention must be {{'count': n}} or {{'threshold': t}}, "
                                   f"got {self.shared_attention!r}")

    def needs_attention_maps(self) -> bool:
        return self.shared_attention is not None
