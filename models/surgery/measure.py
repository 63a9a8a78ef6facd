"""The KV cache a real generate() allocates, in bytes: of a plain HF model (DynamicCache) and of a KVForge
model (KVForgeCache's own accounting). What the spec's byte arithmetic (configuration_kvforge) is checked
against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
