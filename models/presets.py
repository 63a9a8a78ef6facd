"""Named compression layouts as data: functions of the layer count that return a CompressionSpec.

Every preset builds the per-layer list of `LayerSpec` fields (docs/ARCHITECTURE.md) and hands it to
`CompressionSpec`, whose validation names the layer and field of anything wrong. Presets only describe
*what* the compressed model looks like; how the new weights are initialised (averaging shared K/V
projections, spending a rank budget greedily by calibration error, choosing shared-attention spans from
attention maps) is `surgery.SurgerySettings`.

MixAttention (Rajput et al. 2024, arXiv 2409.15012). The paper studies 24-layer models in which most
layers use sliding-window attention, a few use global ("standard") attention, and KV caches are shared
across layers. Its variants, in its words and with the layer indices we use for 24 layers (G = global,
W = window; "x <- j" reads layer j's cache):
  * MA            the first layer is global with its own cache; the other global layers (middle, last) reuse
                  it; window layers share caches in small groups.            G at 0, 12 <- 0, 23 <- 0
  * MA-EndSlide   as MA, but the last layer is a window layer.               G at 0, 12 <- 0
  * MA-Offset     as MA, but the first global layer (the one computing the shared cache) is moved deeper,
                  so that cache comes from a layer that has already mixed local context.
                                                                              G at 4, 12 <- 4, 23 <- 4
  * MA-Pairs      global layers come in pairs, each pair sharing one cache, so two global caches exist,
                  the second computed deep in the network.                   G at 4, 12 <- 4; 16, 23 <- 16
  The paper gives these layouts as 24-layer diagrams; the exact indices above are our reading of them
  (the paper does not state a rule for other depths). For N layers we scale the 24-layer index x to
  round(x * (N - 1) / 23). Window layers between global ones share one cache per run of
  `window_group` (default 2: the paper's and Character.AI's "2-3 adjacent layers"); the first layer of a
  run computes it. The paper's window is 1024 tokens (a parameter here).
  * standard      every layer global, nothing shared: the paper's baseline (the original model).

Character.AI ("Optimizing AI Inference at Character.AI", 2024): one global layer in every 6 (the first
of each block of 6), the others local with a 1024-token window; KV caches are tied between adjacent local
layers (groups of `local_group`, 2-3) and across global layers (every global layer reads the first one's).

Low-rank budgets: `low_rank` gives every layer a low-rank K/V at a uniform rank chosen so the cache is
`budget` of the dense one; with `surgery.rank_allocation: greedy` (every shipped low-rank recipe; the default,
"as_given", keeps the uniform ranks) surgery re-spends the same total across layers and between K and V by
calibration error (surgery.SurgerySettings).

Free-form layouts: `layout("G W W<1 W ...")` or `custom([...])` with one dict of LayerSpec fields per layer.

Every preset takes `cache_bits` (8 or 4: each layer that caches something holds int8 or 4-bit values with
per-token scales, LayerSpec.cache_bits); `low_rank` also spends its budget on the bytes that buys, the others apply
it to the layout they build (`standard` with `cache_bits: 8` is the original model with an 8-bit KV cache: half the
bytes, no surgery).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, NamedTuple, Optional

from kvforge.suggest import did_you_mean

from .configuration_kvforge import Geometry, cache_rank_step, head_dim_of

PAPER_LAYERS = 24  # the depth of the MixAttention paper's models, whose layouts the MA presets scale


class PresetError(ValueError):
    """An unknown preset, a bad argument to one, or a layout that cannot be built for this depth."""


# ---------------------------------------------------------------------------------------------------
# Building blocks


def global_layer(kv_from: Optional[int] = None) -> dict[str, Any]:
    return {"attention": "global", "kv_from": kv_from}


def window_layer(window: int, sinks: int = 0, kv_from: Optional[int] = None) -> dict[str, Any]:
    return {"attention": "window", "window": window, "sinks": sinks, "kv_from": kv_from}


def _spec(layers: list[dict[str, Any]]) -> Any:
    """The CompressionSpec of a per-layer field list (parsed; validated against a model by `build_preset`)."""
    from .configuration_kvforge import CompressionSpec, CompressionSpecError

    try:
        return CompressionSpec.from_dict({"layers": layers})
    except CompressionSpecError as e:
        raise PresetError(str(e)) from None


def _scaled(index_24: int, num_layers: int) -> int:
    return round(index_24 * (num_layers - 1) / (PAPER_LAYERS - 1))


def _check_depth(num_layers: Any, minimum: int, preset: str) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < minimum:
        raise PresetError(f"preset {preset!r} needs num_layers >= {minimum} (an integer), got {num_layers!r}")


def _check_window(window: Any, sinks: Any, preset: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PresetError(f"preset {preset!r}: window must be a positive integer, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise PresetError(f"preset {preset!r}: sinks must be a non-negative integer, got {sinks!r}")


def mix_layout(num_layers: int, global_groups: list[list[int]], *, window: int, sinks: int = 0,
               window_group: int = 2, preset: str = "mix_layout") -> list[dict[str, Any]]:
    """Window layers everywhere except the global layers; each global group shares its first layer's cache;
    runs of consecutive window layers share one cache per `window_group` layers (1: no sharing).

    Args:
        global_groups: lists of global layer indices; the first of each list computes the cache.
    """
    _check_window(window, sinks, preset)
    if isinstance(window_group, bool) or not isinstance(window_group, int) or window_group < 1:
        raise PresetError(f"preset {preset!r}: window_group must be a positive integer, got {window_group!r}")
    layers: list[Optional[dict[str, Any]]] = [None] * num_layers
    for group in global_groups:
        group = sorted(set(group))
        for position, index in enumerate(group):
            if not 0 <= index < num_layers:
                raise PresetError(f"preset {preset!r}: global layer {index} is outside 0..{num_layers - 1}")
            if layers[index] is not None:
                raise PresetError(f"preset {preset!r}: layer {index} appears in two global groups for {num_layers} layers")
            layers[index] = global_layer(None if position == 0 else group[0])
    run_start, run_length = None, 0
    for index in range(num_layers):
        if layers[index] is not None:
            run_start, run_length = None, 0
            continue
        if run_start is None or run_length == window_group:
            run_start, run_length = index, 0
        layers[index] = window_layer(window, sinks, None if index == run_start else run_start)
        run_length += 1
    return layers  # type: ignore[return-value]


def _scaled_groups(groups_24: list[list[int]], num_layers: int, preset: str) -> list[list[int]]:
    groups = [sorted({_scaled(x, num_layers) for x in g}) for g in groups_24]
    flat = [i for g in groups for i in g]
    if len(flat) != len(set(flat)) or sum(map(len, groups)) != sum(map(len, groups_24)):
        raise PresetError(f"preset {preset!r} places {sum(map(len, groups_24))} global layers and cannot fit them "
                          f"apart in {num_layers} layers; use more layers or a `layout` string")
    return groups


# ---------------------------------------------------------------------------------------------------
# Presets: every one takes num_layers first and returns a CompressionSpec.


def standard(num_layers: int) -> Any:
    """Every layer global with its own dense K/V: the uncompressed model (MixAttention's baseline)."""
    _check_depth(num_layers, 1, "standard")
    return _spec([global_layer() for _ in range(num_layers)])


class MixAttentionVariant(NamedTuple):
    """One MixAttention variant as data (the module doc describes them)."""

    groups_24: list[list[int]]  # the global groups at the paper's 24 layers; each group's first computes the cache
    min_layers: int  # the fewest layers the groups fit apart in
    doc: str


MIXATTENTION: dict[str, MixAttentionVariant] = {
    "mixattention-ma": MixAttentionVariant(
        [[0, 12, 23]], 3, 'MixAttention "MA": global at layers 0, 12, 23 of 24 (scaled), all reading layer 0\'s cache.'),
    "mixattention-endslide": MixAttentionVariant(
        [[0, 12]], 3, 'MixAttention "MA-EndSlide": MA with the last layer a window layer (global at 0, 12 <- 0 of 24).'),
    "mixattention-offset": MixAttentionVariant(
        [[4, 12, 23]], 4,
        'MixAttention "MA-Offset": the shared global cache computed deeper (global at 4, 12 <- 4, 23 <- 4 of 24).'),
    "mixattention-pairs": MixAttentionVariant(
        [[4, 12], [16, 23]], 5,
        'MixAttention "MA-Pairs": two global caches, each shared by a pair (4, 12 <- 4; 16, 23 <- 16 of 24).'),
}


def mixattention(variant: str, num_layers: int, window: int = 1024, sinks: int = 0, window_group: int = 2) -> Any:
    """The MixAttention preset `variant` (a key of MIXATTENTION) for `num_layers` layers."""
    groups_24, min_layers, _ = MIXATTENTION[variant]
    _check_depth(num_layers, min_layers, variant)
    groups = _scaled_groups(groups_24, num_layers, variant)
    return _spec(mix_layout(num_layers, groups, window=window, sinks=sinks, window_group=window_group, preset=variant))


def _mixattention_preset(variant: str) -> Callable[..., Any]:
    """The preset function of one variant: num_layers first, then the arguments a config may give."""
    def preset(num_layers: int, window: int = 1024, sinks: int = 0, window_group: int = 2) -> Any:
        return mixattention(variant, num_layers, window=window, sinks=sinks, window_group=window_group)

    preset.__name__ = preset.__qualname__ = variant.replace("-", "_")
    preset.__doc__ = MIXATTENTION[variant].doc
    return preset


mixattention_ma = _mixattention_preset("mixattention-ma")
mixattention_endslide = _mixattention_preset("mixattention-endslide")
mixattention_offset = _mixattention_preset("mixattention-offset")
mixattention_pairs = _mixattention_preset("mixattention-pairs")


def character_ai(num_layers: int, window: int = 1024, sinks: int = 0, period: int = 6, local_group: int = 2) -> Any:
    """Character.AI: the first layer of every `period` is global (all global layers read the first one's
    cache); the others are local window layers sharing caches in groups of `local_group`."""
    _check_depth(num_layers, 1, "character-ai")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise PresetError(f"preset 'character-ai': period must be a positive integer, got {period!r}")
    groups = [list(range(0, num_layers, period))]
    return _spec(mix_layout(num_layers, groups, window=window, sinks=sinks, window_group=local_group, preset="character-ai"))


def sliding_window(num_layers: int, window: int = 1024, sinks: int = 0, global_every: int = 0) -> Any:
    """Window attention in every layer (every `global_every`-th layer, from 0, global if > 0); nothing shared."""
    _check_depth(num_layers, 1, "sliding-window")
    _check_window(window, sinks, "sliding-window")
    layers = [global_layer() if global_every and i % global_every == 0 else window_layer(window, sinks)
              for i in range(num_layers)]
    return _spec(layers)


def low_rank(num_layers: int, num_kv_heads: int, head_dim: int, budget: float = 0.5,
             rope: str = "pre_rope_latent", rope_dims: int = 16, rope_shared: bool = False,
             cache_bits: Optional[int] = None) -> Any:
    """Every layer low-rank at a uniform rank so the cache is `budget` (a fraction) of the dense one.

    pre_rope_latent: k_rank = v_rank = budget * n_kv * d. partial: n_kv * rope_dims rotary dims cached as
    they are, and a joint latent of rank budget * 2 n_kv d - n_kv rope_dims; with rope_shared, one rotary key of
    rope_dims for every head (DeepSeek MLA) and a joint latent of rank budget * 2 n_kv d - rope_dims.

    cache_bits=8 (4): the latents are cached in int8 (4-bit integers, two per byte) with a 16-bit scale per token
    and tensor, so the same bytes of a 16-bit dense cache hold twice (four times) the elements less the scales'
    (surgery's greedy budget then spends the exact bytes of the model's cache dtype).

    Raises:
        PresetError: a budget outside (0, 1] or one too small for the rotary dims.
    """
    _check_depth(num_layers, 1, "low-rank")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise PresetError(f"preset 'low-rank': budget must be a fraction in (0, 1] of the dense cache, got {budget!r}")
    if cache_bits not in (None, 4, 8) or isinstance(cache_bits, bool):
        raise PresetError(f"preset 'low-rank': cache_bits must be null (the model's dtype), 4 or 8, got {cache_bits!r}")
    dense = 2 * num_kv_heads * head_dim
    # Elements per layer the budget buys, in the units of a 16-bit cache: a b-bit one holds 16 / b per 16 bits,
    # less one 16-bit scale per cached tensor (two of them in either layout). A 4-bit cache's dims are even.
    per_16_bits = 1 if cache_bits is None else 16 // cache_bits
    elements = per_16_bits * (math.floor(budget * dense) - (0 if cache_bits is None else 2))
    step = cache_rank_step(cache_bits)
    if rope == "pre_rope_latent":
        # At most full rank: 4 bits at 50% would buy more.
        rank = min(num_kv_heads * head_dim, max(step, elements // 2 // step * step))
        layer = {"kv_proj": "low_rank", "rope": rope, "k_rank": rank, "v_rank": rank}
    elif rope == "partial":
        if not isinstance(rope_shared, bool):
            raise PresetError(f"preset 'low-rank': rope_shared must be true or false, got {rope_shared!r}")
        joint = (2 * num_kv_heads * head_dim if rope_shared  # the widest joint latent the spec allows
                 else num_kv_heads * (head_dim - rope_dims) + num_kv_heads * head_dim)
        kv_rank = min(joint, (elements - (1 if rope_shared else num_kv_heads) * rope_dims) // step * step)
        if kv_rank < 1:
            raise PresetError(f"preset 'low-rank': a budget of {budget} ({elements} elements per layer) "
                              f"leaves no room for a latent beside {num_kv_heads} x {rope_dims} rotary dims; "
                              "lower rope_dims or raise the budget")
        layer = {"kv_proj": "low_rank", "rope": rope, "rope_dims": rope_dims, "kv_rank": kv_rank}
        if rope_shared:
            layer["rope_shared"] = True
    else:
        raise PresetError(f"preset 'low-rank': rope must be 'pre_rope_latent' or 'partial', got {rope!r}")
    if cache_bits is not None:
        layer["cache_bits"] = cache_bits
    return _spec([{**global_layer(), **layer} for _ in range(num_layers)])


def merged_heads(num_layers: int, num_kv_heads: int) -> Any:
    """Every layer's KV heads merged to `num_kv_heads` (must divide num_attention_heads; checked by the spec)."""
    _check_depth(num_layers, 1, "merged-heads")
    return _spec([{**global_layer(), "kv_proj": "merged_heads", "num_kv_heads": num_kv_heads} for _ in range(num_layers)])


def shared_attention(num_layers: int, spans: list[list[int]]) -> Any:
    """Named spans [first, last]: layers first+1..last reuse layer `first`'s attention probabilities."""
    _check_depth(num_layers, 2, "shared-attention")
    layers = [global_layer() for _ in range(num_layers)]
    for span in spans:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(i, int) for i in span)
                and 0 <= span[0] < span[1] < num_layers):
            raise PresetError(f"preset 'shared-attention': each span must be [first, last] with "
                              f"0 <= first < last < {num_layers}, got {span!r}")
        for i in range(span[0] + 1, span[1] + 1):
            if layers[i].get("probs_from") is not None:
                raise PresetError(f"preset 'shared-attention': layer {i} is in two spans ({spans})")
            layers[i]["probs_from"] = span[0]
    return _spec(layers)


_TOKEN = re.compile(r"^(?P<kind>[GW])(?:<(?P<src>\d+))?$")


def layout(num_layers: int, text: str, window: int = 1024, sinks: int = 0) -> Any:
    """A layout string, one token per layer: "G" global, "W" window, "<j" reads layer j's cache.

    Example (6 layers): "G W W<1 G<0 W W<4".

    Raises:
        PresetError: a token that is not G/W[<j], or a token count other than num_layers.
    """
    tokens = text.split()
    if len(tokens) != num_layers:
        raise PresetError(f"layout has {len(tokens)} tokens but the model has {num_layers} layers: {text!r}")
    layers = []
    for i, token in enumerate(tokens):
        match = _TOKEN.match(token)
        if not match:
            raise PresetError(f"layout token {i} is {token!r}; expected G or W, optionally followed by <j "
                              "(read layer j's cache), e.g. 'W<3'")
        src = None if match["src"] is None else int(match["src"])
        layers.append(global_layer(src) if match["kind"] == "G" else window_layer(window, sinks, src))
    return _spec(layers)


def custom(num_layers: int, layers: list[dict[str, Any]]) -> Any:
    """A free-form list of LayerSpec field dicts, one per layer (validated by CompressionSpec)."""
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise PresetError(f"custom layers must be a list of {num_layers} dicts (one per layer), got "
                          f"{len(layers) if isinstance(layers, list) else type(layers).__name__}")
    return _spec([dict(layer) for layer in layers])


# ---------------------------------------------------------------------------------------------------
# Registry


PRESETS: dict[str, Callable[..., Any]] = {
    "standard": standard,
    "mixattention-ma": mixattention_ma,
    "mixattention-endslide": mixattention_endslide,
    "mixattention-offset": mixattention_offset,
    "mixattention-pairs": mixattention_pairs,
    "character-ai": character_ai,
    "sliding-window": sliding_window,
    "low-rank": low_rank,
    "merged-heads": merged_heads,
    "shared-attention": shared_attention,
    "layout": layout,
    "custom": custom,
}

# Arguments that come from the model's config rather than from the user.
MODEL_ARGUMENTS = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def build_preset(name: str, model_config: Any, **arguments: Any) -> Any:
    """Call preset `name` with the model's depth/heads filled in from `model_config` and `arguments` (any preset
    takes `cache_bits`).

    Raises:
        PresetError: an unknown preset (with the closest names) or an argument it does not take.
    """
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}{did_you_mean(name, PRESETS, n=3)} Known presets: {preset_names()}")
    fn = PRESETS[name]
    params = inspect.signature(fn).parameters
    # cache_bits composes with every layout: a preset that does not budget with it gets it on each caching layer.
    cache_bits = arguments.pop("cache_bits", None) if "cache_bits" not in params else None
    unknown = sorted(set(arguments) - set(params))
    if unknown:
        accepted = [p for p in params if p not in MODEL_ARGUMENTS]
        raise PresetError(f"preset {name!r} takes no argument(s) {unknown}; it accepts {accepted}")
    call = dict(arguments)
    for param, attr in MODEL_ARGUMENTS.items():
        if param in params and param not in call:
            call[param] = head_dim_of(model_config) if attr == "head_dim" else getattr(model_config, attr, None)
    spec = fn(**call)
    if cache_bits is not None:
        for layer in spec.layers:
            if layer.kv_from is None:
                layer.cache_bits = cache_bits
    Geometry.of(model_config).check_spec(spec)
    return spec
