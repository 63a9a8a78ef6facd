"""Batched sampling from a stock decoder with a preallocated KV cache, and CUDA graphs on a GPU.

The `teacher-samples` data source (trainer/data.py) has the original model write millions of tokens before
training. transformers' generate() spends a decode step mostly in Python: on an H200, SmolLM2-135M sampled
3.9k tokens/s at 256 x 2048 with its dynamic cache and 9.1k with its static cache, where the KV bytes read per
step allow over 100k. This sampler removes the Python: the cache is allocated once, and each decode step is one
CUDA graph replay.

What makes it simple: every row of a batch has the same prompt length (the caller groups prompts by length), so
all rows are at the same position at every step. There is no padding, one position per step, and attention reads
the cache up to that position. On a GPU the decode kernel (kernels/gqa_decode.py) reads that length from the
position tensor, so one graph serves every step. The PyTorch forms need static shapes instead: each step reads
the cache up to the next multiple of `bucket` tokens with the later slots masked, one graph per bucket, captured
on its first use.

Supported: the Llama, Mistral and Qwen2 families (their decoder layers are the same up to q/k/v biases), without
a sliding window shorter than the samples. `unsupported_reason` says why another model is not; the caller then
uses generate().
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import gqa_decode
from ..models.configuration_kvforge import head_dim_of
from ..models.modeling_kvforge import apply_rotary

logger = logging.getLogger(__name__)

# Attention classes whose forward is: q/k/v projections (biases optional), RoPE, softmax(q k^T * scaling) v, o_proj.
SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

# How a decode step attends over the cache: "triton", kernels/gqa_decode.py (reads only the slots written so far,
# the count read from device memory: one CUDA graph for every position); "matmul", two batched matmuls around a
# masked fp32 softmax over the step's span; "sdpa", SDPA with the visibility mask (an H200 profile at
# 1,024 x 2,048: cuDNN's masked kernel took 732 us per layer where the K / V bytes allow ~200 us, 86% of the step).
# "auto": matmul (measured on the H200: 55.4k tokens/s at 1,024 x 2,048, from SDPA's 39.5k); triton is chosen
# explicitly until a GPU run has measured it. Prefill (several tokens) always takes matmul.
ATTENTION = ("auto", "triton", "matmul", "sdpa")


def unsupported_reason(model: Any, max_len: int) -> str | None:
    """None when StaticCacheSampler can sample `max_len` tokens from `model`, else why not (one line)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None or getattr(inner, "rotary_emb", None) is None:
        return f"{type(model).__name__} is not a decoder with model.layers, model.rotary_emb and lm_head"
    for i, layer in enumerate(layers):
        name = type(layer.self_attn).__name__
        if name not in SUPPORTED_ATTENTION:
            return f"layer {i} has attention {name}; supported: {', '.join(SUPPORTED_ATTENTION)}"
        window = getattr(layer.self_attn, "sliding_window", None)
        if name == "MistralAttention":
            window = getattr(model.config, "sliding_window", None)
        if window is not None and window < max_len:
            return f"layer {i} has a sliding window of {window} tokens, shorter than the {max_len}-token samples"
    return None


class StaticCacheSampler:
    """Samples `batch_size` rows of up to `max_len` tokens from a Llama/Mistral/Qwen2 model in its own dtype.

    `sample(prompt_BP, new_tokens, warp, generator)` returns [B, P + new_tokens] token ids: the prompt, then tokens
    drawn from softmax(warp(logits)) one position at a time. `warp` maps [B, V] fp32 logits to scores (temperature,
    top-p, banned tokens); the draw is torch.multinomial, as in generate(). CUDA graphs are used on a GPU unless
    `cuda_graphs=False`; CPU runs the same step eagerly, which is what the tests compare against the model.
    """

    def __init__(self, model: Any, batch_size: int, max_len: int, bucket: int = 256,
                 cuda_graphs: bool | None = None, attention: str = "auto"):
        reason = unsupported_reason(model, max_len)
        if reason is not None:
            raise ValueError(f"StaticCacheSampler cannot sample from this model: {reason}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.model = model
        config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.head_dim = head_dim_of(config)
        if attention == "auto":
            attention = "matmul"
        if attention == "triton" and not (gqa_decode.available() and gqa_decode.fits_head_dim(self.head_dim)):
            raise ValueError(f"attention 'triton' needs a head size that is a power of two >= 16 and triton "
                             f"installed (head size {self.head_dim}); use attention='matmul'")
        self.attention = attention
        self.batch_size, self.max_len = batch_size, max_len
        self.bucket = max(1, min(bucket, max_len))
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.layers = model.model.layers
        self.scales = [layer.self_attn.scaling for layer in self.layers]
        cache_shape = (len(self.layers), batch_size, self.n_kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        # RoPE tables for every position, from the model's own rotary module (so its scaling variants apply).
        positions = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = model.model.rotary_emb(probe, positions)
        self.cos_LD, self.sin_LD = cos[0], sin[0]
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Static inputs and outputs of the captured decode step.
        self.token_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @torch.no_grad()
    def forward(self, tokens_BN: torch.Tensor, start: torch.Tensor, span: int) -> torch.Tensor:
        """Logits [B, N, V] for tokens at positions start .. start + N - 1, writing their keys and values into
        the cache; attention reads cache slots [0, span) and masks those after each query's position. `start` is
        a 1-element device tensor, so a captured graph reads it at replay."""
        B, N = tokens_BN.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        group = Hq // Hkv
        positions_N = start + torch.arange(N, device=self.device)
        cos_1N1D, sin_1N1D = self.cos_LD[positions_N][None, :, None], self.sin_LD[positions_N][None, :, None]
        # Query rows are (head in group, position); slot j is visible to the query at position p when j <= p.
        visible_NS = torch.arange(span, device=self.device)[None, :] <= positions_N[:, None]
        visible_MS = visible_NS.repeat(group, 1)
        x_BNH = self.model.model.embed_tokens(tokens_BN)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h_BNH = layer.input_layernorm(x_BNH)
            q_BNhD = apply_rotary(attn.q_proj(h_BNH).view(B, N, Hq, D), cos_1N1D, sin_1N1D)
            k_BNhD = apply_rotary(attn.k_proj(h_BNH).view(B, N, Hkv, D), cos_1N1D, sin_1N1D)
            v_BNhD = attn.v_proj(h_BNH).view(B, N, Hkv, D)
            self.keys[i].index_copy_(2, positions_N, k_BNhD.transpose(1, 2))
            self.values[i].index_copy_(2, positions_N, v_BNhD.transpose(1, 2))
            # GQA without repeating the cache: the `group` query heads of one KV head become extra query rows
            # (query head h reads KV head h // group, transformers' repeat_kv order).
            q_BhMD = q_BNhD.transpose(1, 2).reshape(B, Hkv, group * N, D)
            keys_BhSD, values_BhSD = self.keys[i, :, :, :span], self.values[i, :, :, :span]
            if self.attention == "triton" and N == 1:
                out_BhMD = gqa_decode.gqa_decode_attention(q_BhMD, self.keys[i], self.values[i], start + 1,
                                                           self.scales[i])
            elif self.attention == "sdpa":
                out_BhMD = F.scaled_dot_product_attention(q_BhMD, keys_BhSD, values_BhSD, attn_mask=visible_MS,
                                                          scale=self.scales[i])
            else:
                scores_BhMS = (q_BhMD @ keys_BhSD.transpose(-1, -2)).float().mul_(self.scales[i])
                probs_BhMS = scores_BhMS.masked_fill_(~visible_MS, float("-inf")).softmax(dim=-1)
                out_BhMD = probs_BhMS.to(values_BhSD.dtype) @ values_BhSD
            out_BNH = out_BhMD.reshape(B, Hq, N, D).transpose(1, 2).reshape(B, N, Hq * D)
            x_BNH = x_BNH + attn.o_proj(out_BNH)
            x_BNH = x_BNH + layer.mlp(layer.post_attention_layernorm(x_BNH))
        return self.model.lm_head(self.model.model.norm(x_BNH))

    def _span(self, position: int) -> int:
        return min(self.max_len, (position // self.bucket + 1) * self.bucket)

    def _decode_span(self, position: int) -> int:
        # The kernel reads the length from the position tensor: one span (one graph) for every position.
        return self.max_len if self.attention == "triton" else self._span(position)

    def _decode(self, token_B: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [B, V] of one token per row at `position`."""
        self.token_B.copy_(token_B)
        self.position.fill_(position)
        span = self._decode_span(position)
        if not self.cuda_graphs:
            return self.forward(self.token_B[:, None], self.position, span)[:, 0]
        if span not in self.graphs:
            try:
                self.graphs[span] = self._capture(span)
            except RuntimeError as e:  # a capture the installed torch cannot do: the same step, eagerly
                logger.warning("teacher-samples: CUDA graph capture failed (%s); sampling without graphs", e)
                self.cuda_graphs = False
                return self.forward(self.token_B[:, None], self.position, span)[:, 0]
        graph, logits_BV = self.graphs[span]
        graph.replay()
        return logits_BV

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (as torch.cuda.graphs asks), then capture; graphs share one memory pool.
        # The warm-up writes the current token's keys and values, which the replay rewrites identically.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(self.token_B[:, None], self.position, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits_BV = self.forward(self.token_B[:, None], self.position, span)[:, 0]
        self.pool = graph.pool()
        return graph, logits_BV

    @torch.no_grad()
    def sample(self, prompt_BP: torch.Tensor, new_tokens: int, warp: Any,
               generator: torch.Generator | None = None) -> torch.Tensor:
        B, P = prompt_BP.shape
        if B > self.batch_size or P + new_tokens > self.max_len or P < 1:
            raise ValueError(f"a batch of {B} prompts of {P} tokens + {new_tokens} new tokens does not fit this "
                             f"sampler (batch {self.batch_size}, {self.max_len} tokens)")
        prompt_BP = prompt_BP.to(self.device)
        if B < self.batch_size:  # graphs have the full batch's shape; the extra rows are discarded
            prompt_BP = torch.cat([prompt_BP, prompt_BP[-1:].expand(self.batch_size - B, P)])
        out_BL = torch.empty(self.batch_size, P + new_tokens, dtype=torch.long, device=self.device)
        out_BL[:, :P] = prompt_BP
        logits_BV = self.forward(prompt_BP, torch.zeros(1, dtype=torch.long, device=self.device),
                                 self._span(P - 1))[:, -1]
        for step in range(new_tokens):
            # Only the real rows are drawn, so the random stream is the one generate() would use; padding rows
            # copy the last real row's token.
            probs_BV = warp(logits_BV[:B].float()).softmax(dim=-1)
            out_BL[:B, P + step] = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
            out_BL[B:, P + step] = out_BL[B - 1, P + step]
            if step + 1 < new_tokens:
                logits_BV = self._decode(out_BL[:, P + step], P + step)
        return out_BL[:B]
