"""The surgery's steps, one method per file (see the package doc): resolve the spec, transform the state dict
layer by layer, build and load. The `compression:` section is parsed by compression_config.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..calibration import CalibrationStatistics, collect_statistics
from ..configuration_kvforge import CompressionSpec, Geometry, KVForgeConfig, original_kv_bytes_per_token
from . import head_merging, kv_sharing, low_rank, rank_allocation, shared_attention
from .base import Transform
from .settings import SurgeryError, SurgerySettings


# ---------------------------------------------------------------------------------------------------
# Step 1: resolve the data-dependent parts of the spec


def needs_statistics(spec: CompressionSpec, settings: SurgerySettings) -> bool:
    """Calibration is needed for low-rank or merged layers and for choosing shared-attention spans."""
    return settings.needs_attention_maps() or any(l.kv_proj in ("low_rank", "merged_heads") for l in spec.layers)


def spec_kv_bytes_per_token(spec: CompressionSpec, geometry: Geometry, settings: SurgerySettings) -> float:
    """The spec's KV bytes per token at settings.context_tokens (None: the long-context rate)."""
    return spec.kv_cache_bytes_per_token(num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
                                         dtype=settings.cache_dtype, num_tokens=settings.context_tokens)


# ---------------------------------------------------------------------------------------------------
# Step 2: transform the state dict


def transform_state_dict(
    state: Mapping[str, torch.Tensor], spec: CompressionSpec, geometry: Geometry,
    stats: Optional[CalibrationStatistics], settings: SurgerySettings, expected: Mapping[str, torch.Size],
    rope_inv_freq: Optional[torch.Tensor] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed model's state dict from the pretrained one, and a per-layer report.

    Non-attention tensors are the very same tensors (bit-identical); attention tensors follow each
    layer's spec, through its method's `transform_layer`: kv_sharing (a kv_from consumer), head_merging,
    low_rank; a dense layer keeps its projections, and a probs_from consumer (shared_attention) drops its
    q_proj and k_proj. `expected` (name -> shape of the target module's state) decides only optional biases
    (v_up.bias) and is asserted against afterwards in `load_checked`. `rope_inv_freq` [d/2] (the model's RoPE
    frequencies) is needed by init="output_aware" for pre-RoPE key latents.
    """
    t = Transform(spec, geometry, stats, settings, expected, rope_inv_freq,
                  attn=kv_sharing.effective_attention(state, spec, settings))
    for key, tensor in state.items():
        if ".self_attn." not in key:
            t.out[key] = tensor
    report: dict[str, Any] = {"layers": []}
    for i, layer in enumerate(spec.layers):
        a = t.attn[i]
        entry: dict[str, Any] = {"layer": i}
        computes_probs = layer.probs_from is None
        if computes_probs:
            t.put(i, "q_proj", a.q_weight, a.q_bias)
        t.put(i, "o_proj", a.o_weight, a.o_bias)
        if layer.kv_from is not None:
            kv_sharing.transform_layer(t, i, entry)
        elif layer.kv_proj == "dense":
            if computes_probs:
                t.put(i, "k_proj", a.k_weight, a.k_bias)
            t.put(i, "v_proj", a.v_weight, a.v_bias)
            entry["kv"] = "dense"
        elif layer.kv_proj == "merged_heads":
            head_merging.transform_layer(t, i, entry)
        else:  # low_rank
            low_rank.transform_layer(t, i, entry)
        if layer.probs_from is not None:
            entry["probs"] = f"reuses layer {layer.probs_from}"
        if layer.cache_bits is not None:
            entry["kv"] += f", cached in {layer.cache_bits} bits"
        report["layers"].append(entry)
    return t.out, report


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
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    geometry = Geometry.of(model.config)
    spec = spec if isinstance(spec, CompressionSpec) else CompressionSpec.from_dict(dict(spec))
    geometry.check_spec(spec)

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
        seconds["statistics"] = time.perf_counter() - started
    if statistics is not None and (statistics.num_layers != geometry.num_layers or statistics.hidden_size != geometry.hidden_size):
        raise SurgeryError(f"the calibration statistics are of a model with {statistics.num_layers} layers of width "
                           f"{statistics.hidden_size}, this one has {geometry.num_layers} of {geometry.hidden_size}")

    with _bounded_threads():
        # ---- step 1: resolve data-dependent choices
        state = {k: v.detach() for k, v in model.state_dict().items()}
        rope_inv_freq = _rope_inv_freq(model)
        if settings.shared_attention is not None:
            spec = shared_attention.choose_shared_attention(spec, statistics, geometry, settings)
            geometry.check_spec(spec)
        config = KVForgeConfig.from_base_config(model.config, spec)
        expected = _expected_state(config)
        mark = time.perf_counter()
        if settings.rank_allocation != "as_given":
            attn = kv_sharing.effective_attention(state, spec, settings)
            problems = low_rank.low_rank_problems(spec, statistics, attn, geometry, settings, expected, rope_inv_freq)
            spec = rank_allocation.resolve_ranks(spec, problems, geometry, settings)
            geometry.check_spec(spec)
            config = KVForgeConfig.from_base_config(model.config, spec)
            expected = _expected_state(config)
        seconds["rank_allocation"] = time.perf_counter() - mark

        # ---- step 2: transform the state dict
        mark = time.perf_counter()
        new_state, report = transform_state_dict(state, spec, geometry, statistics, settings, expected, rope_inv_freq)
        seconds["transform"] = time.perf_counter() - mark

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
        seconds={k: round(v, 2) for k, v in (seconds | {"total": time.perf_counter() - started}).items()},
    )
    return SurgeryResult(compressed, spec, report, statistics)


# Surgery's linear algebra is many float64 factorisations of hidden-size matrices (576 x 576 for SmolLM2), each
# too small to gain from dozens of threads. With one thread per core of the 32-core GPU host it took 48 s where this
# 2-core machine takes ~1 s, and 190 s with two surgeries at once (docs/results/recovery-h200/README.md,
# session 9): every parallel region waits for its slowest thread, and one core busy elsewhere stalls them all.
SURGERY_THREADS = 8


@contextlib.contextmanager
def _bounded_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, SURGERY_THREADS, (os.cpu_count() or 2) // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
