"""Stock transformers architectures for the compressed layouts that have one exactly (`--format auto|stock`).

A KVForge model whose layout a stock class expresses exactly is exported as that class, so serving engines
(vLLM, SGLang, TGI, llama.cpp) run it with their own kernels and no remote code. Each mapping is data:
which per-layer fields it accepts, which fields must be one value across layers, which model-level fields
it cannot hold, its config fields, and the state-dict renames and zero tensors it needs.

    all layers global, dense or merged_heads(m) with one m         -> LlamaForCausalLM, num_key_value_heads=m
    global + sliding window (no sinks), one window, one head count -> Qwen2ForCausalLM, layer_types +
                                                                       sliding_window (zero q/k/v biases
                                                                       when the model has none)
    all layers global, low_rank partial with rope_shared (one rotary  -> DeepseekV3ForCausalLM (MLA,
      key), one kv_rank and rope_dims, no q/k/v or MLP biases            q_lora_rank=None, every MLP dense)

DeepSeek-V3 (MLA): q_proj = per head [q_proj's D dims | q_rope's Dr] times sqrt((D + Dr) / D) (DeepSeek scales scores
by (D + Dr)^-1/2, kvforge by D^-1/2); kv_a_proj_with_mqa = [latent | k_rope]; kv_b_proj = per QUERY head [k_up; v_up]
rows of its kv head (num_key_value_heads = num_attention_heads: GQA is expanded in the weights, never in the cache);
v_up's bias folds into o_proj's bias (attention weights sum to 1). qk_nope_head_dim = v_head_dim = D,
qk_rope_head_dim = Dr, rope_interleave=False. DeepSeek's RoPE has Dr/2 frequencies theta'^(-2i/Dr); kvforge's shared
key keeps pairs f = stride * i of the head's theta^(-2f/D), the same frequencies for theta' = theta^(stride Dr / D):
so the kept pairs must be 0, stride, 2 stride, ... in every layer (rope_pair_criterion "high" or "uniform" gives
that; "norm" usually does not, and such a model is refused, naming the layer), under rope_type default, linear or
llama3 (their adjustments read only the frequencies). DeepSeek also RMS-normalises the latent (kv_a_layernorm);
kvforge's layout does not (a norm makes surgery inexact), so the export builds an equivalent: one extra latent dim
holding a constant beta (kv_a_proj bias; its norm weight and kv_b_proj column are 0) makes rms(latent) ~ beta /
sqrt(R + 1) whatever the token, and the other dims' norm weight beta / sqrt(R + 1) undoes it. With beta = 1e3 x a
bound on |latent| over every possible input (||W_down||_2 max|input_layernorm.weight| sqrt(hidden) + |bias|), every
token's latent is scaled by 1 - O(5e-7): exact to fp32 rounding, not bit-exact, at one more cached element per layer
(kv_lora_rank = kv_rank + 1). transformers 5.x's DeepSeek-V3 caches the latent itself (kv_a output after the norm
[B, 1, S, kv_lora_rank] as "keys", the rotated k_rot [B, 1, S, Dr] as "values"), not decompressed K/V: measured
(kv_rank + 1 + rope_dims) elements per token per layer. DeepseekV2ForCausalLM has the same MLA but computes RoPE in
interleaved complex form (no rope_interleave switch) and routes MoE from `first_k_dense_replace` alike; it would fit
with the rotary rows permuted to interleaved order, and is not mapped (one MLA class is enough to serve it).

Window semantics: a kvforge window W lets a token see itself and the W - 1 tokens before it (`q - k < W`);
transformers 5.x's sliding overlay is `kv_idx > q_idx - sliding_window`, the same set, so sliding_window = W
(tests/models/test_stock_export.py checks both sides of the edge). Its DynamicSlidingWindowLayer stores W - 1
tokens between steps (the new token completes the window), one slot less than kvforge's ring of W.

Everything else is refused, naming the layer and the field: sinks, kv_from, probs_from, low_rank, per-layer
head counts or windows, an o_proj / MLP bias under Qwen2. Conversion is checked before anything is written:
the same logits on a fixed left-padded batch (longer than the window) and the same greedy tokens with each
model's own cache through the window's edge (`check_stock`).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from kvforge.models.errors import ExportError

FORMATS = ("auto", "kvforge", "stock")
# Longest row of check_stock's logits batch (two windows + 8 when the window is smaller).
MAX_CHECK_LENGTH = 4104


class StockExportError(ExportError):
    """A layout with no stock equivalent (naming layer and field), or a conversion that fails its check."""


@dataclass(frozen=True)
class Refusal:
    """Why a mapping cannot hold a model: the layer (None: the whole model) and the field."""

    layer: Optional[int]
    field: str
    value: Any
    why: str

    def message(self) -> str:
        where = f"compression.layers[{self.layer}].{self.field}" if self.layer is not None else self.field
        return f"{where}={self.value!r} has no stock transformers equivalent: {self.why}"


# Why a layer field value has no stock equivalent (the first failing field of a layer is reported).
WHY = {
    "sinks": "no stock sliding-window class keeps a row's first tokens visible (StreamingLLM sinks)",
    "cache_bits": "stock classes cache K/V in the model's dtype; a low-bit cache's model was trained against "
                  "its rounded cache values (export with --format kvforge)",
    "kv_from": "stock Llama/Qwen2 layers compute their own K/V (cross-layer KV sharing needs the kvforge class)",
    "probs_from": "no stock class reuses another layer's attention probabilities",
    "kv_proj": "a low-rank K/V cache has no stock Llama/Qwen2 equivalent (DeepSeek MLA caches one shared rotary "
               "key: rope='partial' with rope_shared=true exports as DeepseekV3ForCausalLM; pre-RoPE latents or "
               "rotary dims per KV head have none)",
    "rope": "DeepSeek MLA keeps rotary key dims (rope='partial' with rope_shared=true); pre-RoPE latents have no "
            "stock class",
    "rope_shared": "DeepSeek MLA caches ONE rotary key for every head; rotary dims per KV head have no stock class "
                   "(set rope_shared=true and redo the surgery)",
    "kv_rank": "DeepSeek has one kv_lora_rank for every layer",
    "rope_dims": "DeepSeek has one qk_rope_head_dim for every layer",
    "attention_bias": "DeepSeek's q_proj has no bias (q_lora_rank=None)",
    "attention": "Llama has no sliding-window layers",
    "num_kv_heads": "stock configs have one num_key_value_heads for every layer",
    "window": "Qwen2 has one sliding_window for every sliding layer",
    "attention_output_bias": "Qwen2 (the stock class with per-layer sliding windows) has no o_proj bias",
    "mlp_bias": "Qwen2 (the stock class with per-layer sliding windows) and DeepSeek have no MLP biases",
}

# Config fields every mapping copies from the KVForgeConfig unchanged.
COPIED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
                 "attention_dropout")


@dataclass(frozen=True)
class StockMapping:
    """One stock architecture and the layouts it holds exactly.

    layer_values: per-layer field -> the values allowed (other values are refused naming layer and field).
    uniform: (field, value of a layer) pairs that must be equal across the layers that own K/V.
    model_values: model-level config field -> values allowed.
    fields: config fields beyond COPIED_FIELDS, from (kvforge config, uniform values).
    renames: (regex, replacement) on state-dict keys, applied in order (none needed by today's mappings).
    zero_tensors: stock parameters (regex on the stock key) absent from the kvforge model, filled with zeros.
    weight_fields: config fields read from the weights (kvforge config, state dict) -> dict; may raise
        StockExportError for weights the class cannot hold (e.g. DeepSeek's RoPE frequencies).
    convert: (state dict, kvforge config) -> the stock state dict, before renames (tensors combined or split).
    """

    name: str
    model_type: str
    architecture: str
    layer_values: dict[str, tuple]
    uniform: tuple[tuple[str, Callable[[Any, int], Any]], ...]
    model_values: dict[str, tuple]
    fields: Callable[[Any, dict], dict]
    renames: tuple[tuple[str, str], ...] = ()
    zero_tensors: tuple[str, ...] = ()
    engines: str = ""
    weight_fields: Optional[Callable[[Any, dict], dict]] = None
    convert: Optional[Callable[[dict, Any], dict]] = None

    # ---- does the layout fit? --------------------------------------------------------------------
    def refusal(self, config) -> Optional[Refusal]:
        spec = config.compression_spec
        for i, layer in enumerate(spec.layers):
            for name, allowed in self.layer_values.items():
                value = getattr(layer, name)
                if value not in allowed:
                    return Refusal(i, name, value, WHY[name])
        uniform = self._uniform_values(config)
        if isinstance(uniform, Refusal):
            return uniform
        for name, allowed in self.model_values.items():
            value = getattr(config, name, None)
            if value not in allowed:
                # The layer that needs this class (its first window layer) is named, with the model's field.
                layer = next((i for i, layer in enumerate(spec.layers) if layer.is_window), None)
                if layer is None:
                    return Refusal(None, name, value, WHY[name])
                return Refusal(layer, "attention", "window", f"the model has {name}={value!r} and {WHY[name]}")
        return None

    def _uniform_values(self, config) -> dict | Refusal:
        spec = config.compression_spec
        values: dict[str, tuple[int, Any]] = {}
        for i, layer in enumerate(spec.layers):
            for name, read in self.uniform:
                value = read(config, i)
                if value is None:
                    continue
                if name not in values:
                    values[name] = (i, value)
                elif values[name][1] != value:
                    first, before = values[name]
                    reported = name if getattr(layer, name) is not None else "kv_proj"
                    return Refusal(i, reported, getattr(layer, reported),
                                   f"{WHY[name]} (layer {first} has {name}={before}, layer {i} {value})")
        return {name: value for name, (_, value) in values.items()}

    # ---- the stock config and weights -------------------------------------------------------------
    def stock_config(self, config, state: Optional[dict[str, torch.Tensor]] = None):
        from transformers import AutoConfig

        uniform = self._uniform_values(config)
        assert not isinstance(uniform, Refusal), uniform
        fields = {name: copy.deepcopy(getattr(config, name)) for name in COPIED_FIELDS}
        fields.update(self.fields(config, uniform))
        if self.weight_fields is not None:
            fields.update(self.weight_fields(config, state))
        return AutoConfig.for_model(self.model_type, architectures=[self.architecture], use_cache=True, **fields)

    def stock_state_dict(self, state: dict[str, torch.Tensor], stock_keys: dict[str, torch.Tensor],
                         config=None) -> dict[str, torch.Tensor]:
        if self.convert is not None:
            state = self.convert(state, config)
        out = {}
        for key, value in state.items():
            for pattern, replacement in self.renames:
                key = re.sub(pattern, replacement, key)
            out[key] = value
        for key, like in stock_keys.items():
            if key not in out and any(re.search(p, key) for p in self.zero_tensors):
                out[key] = torch.zeros(like.shape, dtype=like.dtype)
        return out


def _kv_heads(config, i: int) -> Optional[int]:
    layer = config.compression_spec.layers[i]
    if not layer.owns_kv or layer.kv_proj == "low_rank":
        return None
    return layer.num_kv_heads if layer.kv_proj == "merged_heads" else config.num_key_value_heads


def _window(config, i: int) -> Optional[int]:
    layer = config.compression_spec.layers[i]
    return layer.window if layer.is_window else None


def _llama_fields(config, uniform: dict) -> dict:
    # Llama's attention_bias covers q, k, v and o; a model with only one of the two gets zeros for the other.
    return {"num_key_value_heads": uniform["num_kv_heads"],
            "attention_bias": bool(config.attention_bias or config.attention_output_bias),
            "mlp_bias": bool(config.mlp_bias)}


def _qwen2_fields(config, uniform: dict) -> dict:
    # transformers reads layer_types. Readers of the older rule (layer i slides iff i >= max_window_layers) agree
    # when the global layers come first; max_window_layers = the first window layer keeps them right then.
    spec = config.compression_spec
    first_window = next(i for i, layer in enumerate(spec.layers) if layer.is_window)
    return {"num_key_value_heads": uniform["num_kv_heads"], "use_sliding_window": True,
            "sliding_window": uniform["window"], "max_window_layers": first_window,
            "layer_types": ["sliding_attention" if layer.is_window else "full_attention" for layer in spec.layers]}


def _shared_rope_field(name: str) -> Callable[[Any, int], Any]:
    def read(config, i: int):
        layer = config.compression_spec.layers[i]
        return getattr(layer, name) if layer.representation == "partial_shared" else None
    return read


def _deepseek_fields(config, uniform: dict) -> dict:
    # Every layer a dense MLP (first_k_dense_replace = all of them), so the MoE fields are never read; attention_bias
    # gives kv_a_proj the bias the latent's constant carrier needs (and o_proj one, which takes v_up's mean).
    return {"num_key_value_heads": config.num_attention_heads, "q_lora_rank": None,
            "kv_lora_rank": uniform["kv_rank"] + 1, "qk_rope_head_dim": uniform["rope_dims"],
            "qk_nope_head_dim": config.head_dim, "v_head_dim": config.head_dim, "attention_bias": True,
            # DeepSeek's rotary embedding reads head_dim as its width (its config sets head_dim = qk_rope_head_dim,
            # unless a head_dim passed in, like the copied one, overrides it).
            "head_dim": uniform["rope_dims"],
            "rope_interleave": False, "first_k_dense_replace": config.num_hidden_layers, "n_routed_experts": 1,
            "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "num_mtp_layers": 0}


DEEPSEEK_ROPE_TYPES = ("default", "linear", "llama3")  # adjustments that read only the frequencies themselves


def _deepseek_rope(config, state: dict) -> dict:
    """rope_parameters with rope_theta = theta^(stride Dr / D): DeepSeek's Dr/2 frequencies equal the kept pairs'."""
    rope = copy.deepcopy(config.rope_parameters) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in DEEPSEEK_ROPE_TYPES:
        raise StockExportError(f"rope_parameters.rope_type={rope_type!r} has no DeepSeek equivalent for a shared rotary "
                               f"key of a subset of the head's frequencies; expected one of {DEEPSEEK_ROPE_TYPES}")
    strides = {}
    for i in range(config.num_hidden_layers):
        pairs = state[f"model.layers.{i}.self_attn.rope_index"][0]
        stride = int(pairs[1] - pairs[0]) if len(pairs) > 1 else 1
        if stride < 1 or not torch.equal(pairs.cpu(), torch.arange(len(pairs)) * stride):
            raise StockExportError(
                f"compression.layers[{i}] keeps rotary pairs {pairs.tolist()}: DeepSeek's RoPE holds only the pairs 0, "
                f"s, 2s, ... (surgery.rope_pair_criterion 'high' or 'uniform' picks those); not exported as stock")
        strides[i] = stride
    if len(set(strides.values())) > 1:
        raise StockExportError(f"rotary pair strides differ across layers ({strides}); DeepSeek has one rope_theta")
    stride = strides[0]
    rope_dims = config.compression_spec.layers[0].rope_dims
    rope["rope_theta"] = float(rope["rope_theta"]) ** (stride * rope_dims / config.head_dim)
    return {"rope_parameters": rope}


CARRIER_RATIO = 1e3  # beta / the bound on |latent|: every latent scaled by 1 - O(1 / (2 CARRIER_RATIO^2))


def _to_deepseek(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """kvforge shared-rotary layers -> DeepSeek-V3 MLA tensors (module doc: the carrier dim, the query scale)."""
    out = {k: v for k, v in state.items() if ".self_attn." not in k}
    heads, dim = config.num_attention_heads, config.head_dim
    group = heads // config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        rope_dims = config.compression_spec.layers[i].rope_dims
        dtype = state[p + "q_proj.weight"].dtype
        q = state[p + "q_proj.weight"].double().view(heads, dim, -1)
        q_rope = state[p + "q_rope.weight"].double().view(heads, rope_dims, -1)
        assert p + "q_proj.bias" not in state and p + "q_rope.bias" not in state, "refused: attention_bias"
        out[p + "q_proj.weight"] = (torch.cat([q, q_rope], dim=1) * math.sqrt((dim + rope_dims) / dim)).reshape(
            heads * (dim + rope_dims), -1).to(dtype)
        down_w, down_b = state[p + "kv_down.weight"].double(), state[p + "kv_down.bias"].double()
        rank, hidden = down_w.shape
        # Bound on |latent| for any input: the input is input_layernorm.weight * (h / rms(h)), of norm <= max|w| sqrt(E).
        norm_weight = state[f"model.layers.{i}.input_layernorm.weight"].double()
        bound = (torch.linalg.matrix_norm(down_w, ord=2) * norm_weight.abs().max() * math.sqrt(hidden)
                 + down_b.norm()).item()
        beta = max(CARRIER_RATIO * bound, 1.0)
        rope_bias = state.get(p + "k_rope.bias", torch.zeros(rope_dims, dtype=dtype)).double()
        out[p + "kv_a_proj_with_mqa.weight"] = torch.cat([torch.zeros(1, hidden, dtype=torch.float64), down_w,
                                                          state[p + "k_rope.weight"].double()]).to(dtype)
        out[p + "kv_a_proj_with_mqa.bias"] = torch.cat([torch.tensor([beta], dtype=torch.float64), down_b,
                                                        rope_bias]).to(dtype)
        out[p + "kv_a_layernorm.weight"] = torch.cat([torch.zeros(1, dtype=torch.float64),
                                                      torch.full((rank,), beta / math.sqrt(rank + 1),
                                                                 dtype=torch.float64)]).to(dtype)
        kv_head = torch.arange(heads) // group                                            # query head -> kv head
        k_up = state[p + "k_up.weight"].double().view(-1, dim, rank)[kv_head]            # [H, D, R]
        v_up = state[p + "v_up.weight"].double().view(-1, dim, rank)[kv_head]
        b_up = torch.cat([k_up, v_up], dim=1).reshape(heads * 2 * dim, rank)
        out[p + "kv_b_proj.weight"] = torch.cat([torch.zeros(heads * 2 * dim, 1, dtype=torch.float64), b_up],
                                                dim=1).to(dtype)
        o_w = state[p + "o_proj.weight"]
        value_mean = state[p + "v_up.bias"].double().view(-1, dim)[kv_head].reshape(-1)  # [H * D]
        o_b = state.get(p + "o_proj.bias", torch.zeros(o_w.shape[0], dtype=dtype)).double()
        out[p + "o_proj.weight"] = o_w
        out[p + "o_proj.bias"] = (o_b + o_w.double() @ value_mean).to(dtype)
    return out


NO_SHARING = {"sinks": (0,), "kv_from": (None,), "probs_from": (None,), "kv_proj": ("dense", "merged_heads")}
BIAS_SUFFIX = r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias$"

MAPPINGS = (
    # First: it holds only shared-rotary layouts, and a tie between refusals names the later (more general) mapping.
    StockMapping(
        name="deepseek-v3-mla", model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
        layer_values={"attention": ("global",), "sinks": (0,), "kv_from": (None,), "probs_from": (None,),
                      "kv_proj": ("low_rank",), "rope": ("partial",), "rope_shared": (True,)},
        uniform=(("kv_rank", _shared_rope_field("kv_rank")), ("rope_dims", _shared_rope_field("rope_dims"))),
        model_values={"attention_bias": (False,), "mlp_bias": (False,)},
        fields=_deepseek_fields,
        weight_fields=_deepseek_rope,
        convert=_to_deepseek,
        engines="DeepseekV3ForCausalLM (MLA, q_lora_rank=None, dense MLPs): transformers (tested); vLLM and SGLang serve "
                "it with their MLA kernels (not run by kvforge's tests)",
    ),
    StockMapping(
        name="llama", model_type="llama", architecture="LlamaForCausalLM",
        layer_values={"attention": ("global",), **NO_SHARING},
        uniform=(("num_kv_heads", _kv_heads),),
        model_values={},
        fields=_llama_fields,
        zero_tensors=(BIAS_SUFFIX,),
        engines="LlamaForCausalLM: transformers, and the base architecture of vLLM, SGLang, TGI and llama.cpp "
                "(convert_hf_to_gguf.py); only transformers was run by kvforge's tests",
    ),
    StockMapping(
        name="qwen2-sliding", model_type="qwen2", architecture="Qwen2ForCausalLM",
        layer_values={"attention": ("global", "window"), **NO_SHARING},
        uniform=(("num_kv_heads", _kv_heads), ("window", _window)),
        model_values={"attention_output_bias": (False,), "mlp_bias": (False,)},
        fields=_qwen2_fields,
        zero_tensors=(r"\.self_attn\.(q_proj|k_proj|v_proj)\.bias$",),
        engines="Qwen2ForCausalLM with per-layer layer_types: transformers (tested); an engine must honour layer_types "
                "and sliding_window (or max_window_layers, right when the global layers come first) -- one that "
                "ignores sliding windows (llama.cpp's Qwen2) computes full attention in the window layers; not run "
                "by kvforge's tests",
    ),
)


def plan(config) -> tuple[Optional[StockMapping], Optional[Refusal]]:
    """(mapping, None) for the first mapping that holds the layout exactly, else (None, the refusal that got
    furthest: the latest layer, ties to the more general mapping)."""
    if getattr(config, "model_type", None) != "kvforge":
        return None, None
    # No stock class holds a low-bit cache, whatever else the layout is: say that, not the next mismatch.
    low_bit = next(((i, layer) for i, layer in enumerate(config.compression_spec.layers)
                    if layer.cache_bits is not None), None)
    if low_bit is not None:
        return None, Refusal(low_bit[0], "cache_bits", low_bit[1].cache_bits, WHY["cache_bits"])
    refusals = []
    for mapping in MAPPINGS:
        refusal = mapping.refusal(config)
        if refusal is None:
            return mapping, None
        refusals.append(refusal)
    return None, max(reversed(refusals), key=lambda r: -1 if r.layer is None else r.layer)


def to_stock(model: torch.nn.Module, mapping: StockMapping) -> torch.nn.Module:
    """The stock model of `mapping` holding `model`'s weights (copies; same dtype), in eval mode."""
    from transformers import AutoModelForCausalLM

    weights = model.state_dict()
    config = mapping.stock_config(model.config, weights)
    dtype = next(model.parameters()).dtype
    stock = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if type(stock).__name__ != mapping.architecture:
        raise StockExportError(f"transformers built {type(stock).__name__} for {mapping.model_type}, expected "
                               f"{mapping.architecture}")
    state = mapping.stock_state_dict(weights, stock.state_dict(), model.config)
    try:
        stock.load_state_dict(state, strict=True)
    except RuntimeError as error:  # a mapping whose renames do not cover the model: a bug, named
        first = str(error).strip().splitlines()[0]
        raise StockExportError(f"the {mapping.name} mapping does not fit this model's weights: {first}") from None
    if getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    return stock


def left_padded_batch(vocab: int, lengths: tuple[int, ...], pad: int, seed: int = 0):
    """Random ids [len(lengths), max(lengths)] in [3, vocab), row i left-padded with `pad` to length lengths[i],
    and its attention mask: the batch the stock check compares the two models on."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def _max_window(config) -> Optional[int]:
    windows = [layer.window for layer in config.compression_spec.layers if layer.is_window]
    return max(windows) if windows else None


@torch.no_grad()
def check_stock(model: torch.nn.Module, stock: torch.nn.Module, *, new_tokens: int = 8,
                atol: Optional[float] = None) -> dict[str, Any]:
    """The stock model computes what the KVForge model computes: logits on a fixed left-padded batch of two rows
    longer than the largest window (positions from the mask), then greedy generate() with each model's own cache
    from prompts ending just before the window's edge, `new_tokens` steps (through the edge).

    atol: on the logits; default 1e-4 x max(1, largest |logit|) in fp32/fp64, 2e-2 x that in 16-bit.
    Returns {"max_logit_diff", "atol", "tokens", "same_tokens", "logits_positions"}; raises StockExportError.
    """
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    window = _max_window(config)
    length = max(24, 2 * window + 8) if window else 24
    length = min(length, config.max_position_embeddings, MAX_CHECK_LENGTH)
    ids, mask = left_padded_batch(config.vocab_size, (length, max(2, length - 5)), pad)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = model(ids, attention_mask=mask, position_ids=positions).logits.float()
    actual = stock(ids, attention_mask=mask, position_ids=positions).logits.float()
    real = mask.bool()
    diff = (expected[real] - actual[real]).abs().max().item()
    scale = max(1.0, expected[real].abs().max().item())
    if atol is None:
        atol = (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2) * scale
    result = {"max_logit_diff": diff, "atol": atol, "logits_positions": int(real.sum())}
    if not diff <= atol:
        raise StockExportError(f"{type(stock).__name__} gives logits up to {diff:.3g} away from the KVForge model's "
                               f"(tolerance {atol:.3g}) on a {tuple(ids.shape)} batch; not exported as stock")
    prompt = max(6, min(length, (window - 2) if window else 12))
    prompt_ids, prompt_mask = left_padded_batch(config.vocab_size, (prompt, max(2, prompt - 3)), pad, seed=1)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    steps = max(1, min(new_tokens, config.max_position_embeddings - prompt))
    tokens = []
    for m in (model, stock):
        out = m.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, pad_token_id=pad)
        tokens.append(out[:, prompt_ids.shape[1]:])
    same = torch.equal(tokens[0], tokens[1])
    result.update(tokens=tokens[1].tolist(), same_tokens=same, prompt=prompt)
    if not same:
        raise StockExportError(f"greedy generate() with {type(stock).__name__}'s own cache picks "
                               f"{tokens[1].tolist()}, the KVForge model {tokens[0].tolist()}; not exported as stock")
    return result


def stock_cache_bytes(stock: torch.nn.Module, tokens: int) -> dict[str, Any]:
    """Bytes of the cache a real greedy generate() of the stock model allocates over `tokens` positions (one
    sequence), layer by layer, read from its own cache object."""
    from transformers.generation import utils as generation_utils

    config = stock.config
    device = next(stock.parameters()).device
    prompt_tokens = max(1, min(48, tokens // 2))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, prompt_tokens), generator=generator).to(device)
    new = tokens - prompt_tokens + 1  # the last new token is never fed back
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    out = stock.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=pad)
    names = getattr(generation_utils, "ALL_CACHE_NAMES", ("past_key_values",))
    cache = next(getattr(out, name) for name in names if getattr(out, name, None) is not None)
    per_layer = [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                 for layer in cache.layers]
    held = cache.get_seq_length()
    return {"cache": type(cache).__name__, "tokens": held, "total_bytes": sum(per_layer), "per_layer_bytes": per_layer,
            "bytes_per_token": sum(per_layer) / held}


def expected_stock_bytes(kv_config, tokens: int, dtype) -> int:
    """What the stock class's cache holds for one sequence of `tokens` tokens, by the kvforge spec's arithmetic
    with transformers' sliding layers holding W - 1 tokens (kvforge's ring holds W)."""
    from kvforge.models.configuration_kvforge import dtype_num_bytes

    spec = kv_config.compression_spec
    total = 0
    for i, layer in enumerate(spec.layers):
        slots = min(tokens, layer.window - 1) if layer.is_window else tokens
        carrier = 1 if layer.representation == "partial_shared" else 0  # DeepSeek's latent: one constant dim more
        total += (layer.kv_cache_elements_per_token(kv_config.num_key_value_heads, kv_config.head_dim) + carrier) * slots
    return total * dtype_num_bytes(dtype)


@dataclass
class StockExport:
    """What convert_for_export decided: the record (JSON, goes into the manifest) and the KVForge config."""

    record: dict[str, Any]
    kvforge_config: Any = field(repr=False, default=None)


def convert_for_export(model: torch.nn.Module, format: str, *, pyramid=None, new_tokens: int = 8, warn=None
                       ) -> tuple[torch.nn.Module, Optional[StockExport]]:
    """(model to export, StockExport or None) for `format`:

    kvforge: the model as it is. stock: the stock model (StockExportError naming layer and field when the layout
    has none, or when the check fails). auto: the stock model when the layout has one and it passes `check_stock`,
    else the model as it is (the reason goes into the returned record, and to `warn` when a check failed).
    A plain (non-KVForge) model is already stock and returned as it is; a PyramidKV default needs the KVForge class.
    """
    if format not in FORMATS:
        raise StockExportError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    if format == "kvforge" or getattr(model.config, "model_type", None) != "kvforge":
        return model, None
    if pyramid is not None:
        if format == "stock":
            raise StockExportError("a PyramidKV default (--pyramid-*) needs the kvforge class; export with --format "
                                   "kvforge or auto")
        return model, StockExport({"format": "kvforge", "reason": "a PyramidKV default needs the kvforge class"})
    mapping, refusal = plan(model.config)
    if mapping is None:
        if format == "stock":
            raise StockExportError(refusal.message())
        return model, StockExport({"format": "kvforge", "reason": refusal.message()})
    try:
        stock = to_stock(model, mapping)
        check = check_stock(model, stock, new_tokens=new_tokens)
    except StockExportError as error:
        if format == "stock":
            raise
        if warn is not None:
            warn(f"--format auto: {error}; writing the kvforge class")
        return model, StockExport({"format": "kvforge", "reason": str(error)})
    record = {"format": "stock", "mapping": mapping.name, "architecture": mapping.architecture,
              "model_type": mapping.model_type, "check": check, "engines": mapping.engines,
              "kvforge_compression": copy.deepcopy(model.config.compression)}
    return stock, StockExport(record, kvforge_config=copy.deepcopy(model.config))


def stock_kv_summary(stock: torch.nn.Module, export: StockExport, measure_tokens: int) -> dict[str, Any]:
    """The export's KV numbers for a stock model: the kvforge spec's arithmetic (long-sequence rate), the original
    architecture's, and -- if measure_tokens -- the bytes the stock class's own cache holds after a generate() of
    that many positions, which must equal `expected_stock_bytes` (else StockExportError)."""
    from kvforge.models.configuration_kvforge import dtype_num_bytes

    kv_config = export.kvforge_config
    dtype = next(stock.parameters()).dtype
    original = (kv_config.num_hidden_layers * 2 * kv_config.num_key_value_heads * kv_config.head_dim
                * dtype_num_bytes(dtype))
    summary: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "original_bytes_per_token": original,
                               "bytes_per_token": kv_config.kv_cache_bytes_per_token(dtype),
                               "bytes_per_token_at": {n: kv_config.kv_cache_bytes_per_token(dtype, num_tokens=n)
                                                      for n in (2048, 4096)}}
    if measure_tokens:
        measured = stock_cache_bytes(stock, measure_tokens)
        expected = expected_stock_bytes(kv_config, measured["tokens"], dtype)
        if measured["total_bytes"] != expected:
            raise StockExportError(f"{measured['cache']} of {type(stock).__name__} holds {measured['total_bytes']} "
                                   f"bytes after {measured['tokens']} tokens; the kvforge spec says {expected} for it")
        measured["spec_bytes"] = kv_config.kv_cache_bytes(measured["tokens"], dtype)
        measured["original_bytes"] = original * measured["tokens"]
        summary["measured"] = measured
    return summary


def stock_card(card: str, export: StockExport, kv_cache: dict) -> str:
    """The model card of a stock export: what the compressed layout became and how it was checked."""
    record = export.record
    check = record["check"]
    lines = [f"A kvforge-compressed model exported as the stock `{record['architecture']}` (mapping "
             f"`{record['mapping']}`): it loads with plain `AutoModelForCausalLM.from_pretrained` (no remote code). "
             f"Before writing, its logits matched the KVForge model's within {check['max_logit_diff']:.2g} "
             f"(tolerance {check['atol']:.2g}) on {check['logits_positions']} positions and greedy generate() with "
             "its own cache picked the same tokens.", "",
             f"- KV cache, long-sequence rate (kvforge spec): {kv_cache['bytes_per_token']:,.0f} bytes/token "
             f"({kv_cache['bytes_per_token'] / kv_cache['original_bytes_per_token']:.1%} of the original's "
             f"{kv_cache['original_bytes_per_token']:,})"]
    if "measured" in kv_cache:
        m = kv_cache["measured"]
        lines.append(f"- Measured: {m['cache']} after a generate() over {m['tokens']} positions holds {m['total_bytes']:,}"
                     f" bytes (kvforge's own cache: {m['spec_bytes']:,}; transformers keeps W - 1 tokens per sliding "
                     "layer, kvforge W)")
    lines.append(f"- Serving engines: {record['engines']}")
    base = getattr(export.kvforge_config, "base_model_type", "?")
    card = card.replace(f"- Architecture: {record['model_type']},", f"- Architecture: {record['model_type']} (the "
                        f"compressed {base} model, {record['mapping']} mapping),", 1)
    card = card.replace(f"| original {record['model_type']} (", f"| original {base} (", 1)
    return card.replace("An uncompressed model (exported as a plain Hugging Face directory).", "\n".join(lines))


__all__ = ["FORMATS", "MAPPINGS", "StockMapping", "StockExportError", "Refusal", "plan", "to_stock", "check_stock",
           "stock_cache_bytes", "expected_stock_bytes", "convert_for_export", "stock_kv_summary", "stock_card"]
