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

A config's `compression:` section is parsed once into a `CompressionConfig` (compression_config.py); the trainer
and `launch/compress.py` (the command line around surgery) then call
`compress(model, compression.spec_for(model.config), calibration_rows, settings=compression.surgery)`.

Files (this one only re-exports their public names):
    pipeline.py          compress and its three steps
    compression_config.py  CompressionConfig: the `compression:` section, typed, with its one KV budget
    settings.py          SurgerySettings (how the compressed weights are initialised), SurgeryError
    base.py              a layer's pretrained projections and their moments, the Transform step 2 writes into
    kv_sharing.py        kv_from consumers; the producers' averaged projections (kv_sharing_init)
    low_rank.py          pre-RoPE and partial-RoPE latents; the PCA problems the rank allocation spends on
    rank_allocation.py   ranks under a KV budget (greedy) or an energy threshold
    head_merging.py      merged KV heads, folded into q_proj / o_proj
    shared_attention.py  probs_from spans chosen from calibration attention maps
    linalg.py            the factorisations the methods share
    measure.py           the KV bytes a real generate() allocates
The model's shapes and KV-byte arithmetic (Geometry, original_kv_bytes_per_token, layer_slot_fraction) live
beside the spec in configuration_kvforge.py.
"""

from __future__ import annotations

from ..configuration_kvforge import Geometry, layer_slot_fraction, original_kv_bytes_per_token
from .base import DenseAttention, dense_attention
from .kv_sharing import effective_attention
from .low_rank import LowRankProblem, low_rank_problems
from .measure import measure_generate_kv_bytes, measure_original_kv_bytes
from .compression_config import COMPRESSION_KEYS, CompressionConfig
from .pipeline import (
    SurgeryResult, compress, load_checked, needs_statistics, spec_kv_bytes_per_token, transform_state_dict,
)
from .rank_allocation import resolve_ranks
from .settings import RANK_ALLOCATIONS, SurgeryError, SurgerySettings
from .shared_attention import choose_shared_attention

__all__ = [
    "COMPRESSION_KEYS", "CompressionConfig", "DenseAttention", "Geometry", "LowRankProblem", "RANK_ALLOCATIONS",
    "SurgeryError", "SurgeryResult", "SurgerySettings", "choose_shared_attention", "compress", "dense_attention",
    "effective_attention", "layer_slot_fraction", "load_checked", "low_rank_problems", "measure_generate_kv_bytes",
    "measure_original_kv_bytes", "needs_statistics", "original_kv_bytes_per_token", "resolve_ranks",
    "spec_kv_bytes_per_token", "transform_state_dict",
]
