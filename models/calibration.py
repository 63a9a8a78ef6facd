"""Calibration: run a pretrained model over N tokens of real text and keep per-layer statistics.

Every surgery method needs second-order statistics of the K/V projection outputs (low-rank KV, head
merging) or of the queries (the partial-RoPE frequency choice). In Llama, Mistral and Qwen2 the q, k and
v projections of a layer read the same tensor, the input-normed hidden state x, so we keep one thing per
layer: the moments of x,

    second_moment[l] = E[x x^T]   [hidden, hidden] float64        mean[l] = E[x]   [hidden] float64

and derive the moments of any affine map y = W x + b from them (`output_moments`). This costs
hidden^2 * 8 bytes per layer (2.6 MB for SmolLM2, 134 MB for a 4096-wide model) however many tokens are
seen, no activation is ever stored, and it keeps working after surgery changes W: averaging the K/V
projections of layers that share a cache, merging heads or factorising a projection all only need the
moments of their common input.

Accumulation is in float64 from the float32 activations (a 65k-token sum of squares in float32 would
lose about five digits where the eigenvalue tail lives).

Attention maps (for choosing shared-attention spans) cannot be derived from moments. They come from a
second, short pass with the eager attention implementation over the first `attention_rows` rows: for
every pair of layers j < i the mean over rows, heads and query positions of the Jensen-Shannon divergence
(or 1 - cosine similarity) between the two layers' attention distributions of the same head. The result
is a [L, L] matrix, lower triangle filled, NaN elsewhere.

Shapes: B batch, S sequence, H hidden, L layers, n heads, Sq/Sk query/key positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from kvforge import atomic

ATTENTION_METRICS = ("js", "cosine")
STATISTICS_VERSION = 1


class CalibrationError(ValueError):
    """Bad calibration input (rows, model, settings); the message names the value and what was expected."""


@dataclass
class CalibrationStatistics:
    """Per-layer moments of the attention input over `tokens` calibration tokens (see the module doc).

    input_second_moment: [L, H, H] float64, E[x x^T] over all tokens.
    input_mean:          [L, H] float64, E[x].
    attention_divergence: [L, L] float64 or None; [i, j] for j < i is the mean divergence between layer i
        and layer j attention distributions (metric `attention_metric`), NaN on and above the diagonal.
    """

    input_second_moment: torch.Tensor
    input_mean: torch.Tensor
    tokens: int
    rows: int
    seq_len: int
    attention_divergence: Optional[torch.Tensor] = None
    attention_metric: Optional[str] = None
    attention_rows: int = 0
    # Where the rows came from, for the record (source name, model name, ...).
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.input_second_moment.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.input_second_moment.shape[1]

    def output_moments(self, layer: int, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncentered second moment E[y y^T] [d, d] and mean E[y] [d] (float64) of y = weight @ x + bias.

        E[y y^T] = W E[xx^T] W^T + W E[x] b^T + b E[x]^T W^T + b b^T.
        """
        if not 0 <= layer < self.num_layers:
            raise CalibrationError(f"layer {layer} is out of range: the statistics have {self.num_layers} layers")
        if weight.ndim != 2 or weight.shape[1] != self.hidden_size:
            raise CalibrationError(
                f"weight must be [d_out, {self.hidden_size}] (the attention input width), got {tuple(weight.shape)}"
            )
        w = weight.detach().to(torch.float64)
        second, mean = self.input_second_moment[layer], self.input_mean[layer]
        y_second = w @ second @ w.T
        y_mean = w @ mean
        if bias is not None:
            b = bias.detach().to(torch.float64)
            wm = w @ mean
            y_second = y_second + torch.outer(wm, b) + torch.outer(b, wm) + torch.outer(b, b)
            y_mean = y_mean + b
        # Symmetrise: the products above are symmetric only up to rounding, and eigh wants exact symmetry.
        return 0.5 * (y_second + y_second.T), y_mean

    def save(self, path: str | Path) -> None:
        """Write to `path` (torch.save of plain tensors and numbers), atomically."""
        with atomic.file(path) as tmp:
            torch.save({"version": STATISTICS_VERSION, **self.__dict__}, tmp)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStatistics":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.pop("version", None) != STATISTICS_VERSION:
            raise CalibrationError(f"{path} was written by another version of kvforge's calibration; delete it")
        return cls(**blob)


def attention_input_modules(model: nn.Module) -> list[nn.Module]:
    """The k_proj of every decoder layer of a Llama/Mistral/Qwen2-style HF model, in layer order.

    Raises:
        CalibrationError: the model does not have `model.layers[i].self_attn.k_proj`.
    """
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(getattr(layers[0], "self_attn", None), "k_proj"):
        raise CalibrationError(
            f"{type(model).__name__} is not a Llama/Mistral/Qwen2-style causal LM: calibration expects "
            "model.model.layers[i].self_attn.{q,k,v}_proj"
        )
    return [layer.self_attn.k_proj for layer in layers]


def check_rows(rows: Any, vocab_size: int) -> torch.Tensor:
    """Validate calibration token rows: a [N, S] integer tensor of ids in [0, vocab_size)."""
    if not isinstance(rows, torch.Tensor):
        raise CalibrationError(f"calibration rows must be a torch.Tensor [N, seq_len] of token ids, got {type(rows).__name__}")
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
        raise CalibrationError(f"calibration rows must be [N >= 1, seq_len >= 2], got shape {tuple(rows.shape)}")
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise CalibrationError(f"calibration rows must hold integer token ids, got dtype {rows.dtype}")
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= vocab_size:
        raise CalibrationError(f"calibration rows hold token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    return rows.long()


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    rows: torch.Tensor,
    *,
    batch_size: int = 4,
    attention_rows: int = 0,
    attention_metric: str = "js",
    show_progress: bool = True,
    meta: Optional[dict[str, Any]] = None,
    device: Optional[str | torch.device] = None,
) -> CalibrationStatistics:
    """Moments of every layer's attention input over all tokens of `rows` (+ optional attention divergence).

    Args:
        model: a pretrained HF causal LM of the Llama family (q/k/v_proj read the same input).
        rows: [N, S] token ids (packed real text; the trainer and launch/compress.py pass the train split,
            kvforge.trainer.calibration_rows.load_calibration_rows).
        batch_size: rows per forward pass.
        attention_rows: how many of the rows to also run with eager attention to compare attention
            maps between layers (0: skip; needed only to choose shared-attention spans).
        attention_metric: "js" (Jensen-Shannon divergence, nats) or "cosine" (1 - cosine similarity).
        show_progress: a tqdm bar over tokens.
        meta: recorded as-is in the result.
        device: where the forward passes run (None: where the model is). The model is moved there for them and
            back after: surgery itself runs where the model was, and the forward passes need not run on the CPU
            a trainer loads the base model on (on the H200 machine's CPU: 1.8k tokens/s, 35 s per recovery run;
            the GPU's rate is not measured yet).

    Raises:
        CalibrationError: bad rows, model or settings.
    """
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    if attention_metric not in ATTENTION_METRICS:
        raise CalibrationError(f"attention_metric must be one of {ATTENTION_METRICS}, got {attention_metric!r}")
    rows = check_rows(rows, model.config.vocab_size)
    if not 0 <= attention_rows <= rows.shape[0]:
        raise CalibrationError(f"attention_rows must be in [0, {rows.shape[0]}] (the number of rows), got {attention_rows}")
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    model.to(device)
    try:
        return _collect(model, rows, device, batch_size, attention_rows, attention_metric, show_progress, meta)
    finally:
        model.to(home)


def _collect(model: nn.Module, rows: torch.Tensor, device: torch.device, batch_size: int, attention_rows: int,
             attention_metric: str, show_progress: bool, meta: Optional[dict[str, Any]]) -> CalibrationStatistics:
    modules = attention_input_modules(model)
    hidden = modules[0].in_features
    num_layers = len(modules)
    second = torch.zeros(num_layers, hidden, hidden, dtype=torch.float64, device=device)
    total = torch.zeros(num_layers, hidden, dtype=torch.float64, device=device)

    def accumulate(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, hidden).to(torch.float64)  # [B*S, H]
            second[layer].addmm_(x.T, x)
            total[layer].add_(x.sum(0))
        return hook

    handles = [m.register_forward_pre_hook(accumulate(i)) for i, m in enumerate(modules)]
    # Only the decoder stack runs: the lm_head (a fifth of SmolLM2's compute) contributes nothing here.
    decoder = getattr(model, "model", model)
    was_training = model.training
    model.eval()
    n_rows, seq_len = rows.shape
    try:
        with tqdm(total=n_rows * seq_len, unit="tok", desc="calibration", disable=not show_progress) as bar:
            for start in range(0, n_rows, batch_size):
                batch = rows[start:start + batch_size].to(device)
                decoder(input_ids=batch, use_cache=False)
                bar.update(batch.numel())
    finally:
        for h in handles:
            h.remove()
    tokens = n_rows * seq_len
    stats = CalibrationStatistics(
        input_second_moment=(second / tokens).cpu(), input_mean=(total / tokens).cpu(),
        tokens=tokens, rows=n_rows, seq_len=seq_len, meta=dict(meta or {}),
    )
    if attention_rows:
        stats.attention_divergence = attention_divergence(
            model, rows[:attention_rows], metric=attention_metric, show_progress=show_progress)
        stats.attention_metric = attention_metric
        stats.attention_rows = attention_rows
    model.train(was_training)
    return stats


@torch.no_grad()
def attention_divergence(model: nn.Module, rows: torch.Tensor, *, metric: str = "js",
                         show_progress: bool = True) -> torch.Tensor:
    """[L, L] float64: [i, j] (j < i) = mean over rows, heads and query positions of the divergence between
    layer i's and layer j's attention distribution of the same head; NaN on and above the diagonal.

    Runs the model with eager attention (the only implementation that returns probabilities), one row at
    a time: the probabilities of all layers for one row take L * n * S^2 * 4 bytes (283 MB for SmolLM2 at
    S=512). The model's attention implementation is restored afterwards.
    """
    if metric not in ATTENTION_METRICS:
        raise CalibrationError(f"metric must be one of {ATTENTION_METRICS}, got {metric!r}")
    rows = check_rows(rows, model.config.vocab_size)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    num_layers = model.config.num_hidden_layers
    sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    try:
        for row in tqdm(rows, desc="attention maps", unit="row", disable=not show_progress):
            out = model.model(input_ids=row[None].to(device), use_cache=False, output_attentions=True)
            probs = torch.stack([a[0].float() for a in out.attentions])  # [L, n, Sq, Sk]
            for i in range(1, num_layers):
                # Chunks of earlier layers bound the temporaries to a few copies of 8 layers' maps.
                for j in range(0, i, 8):
                    others = probs[j:min(i, j + 8)]
                    sums[i, j:j + others.shape[0]] += _mean_divergence(probs[i], others, metric).double().cpu()
    finally:
        model.set_attn_implementation(previous)
    result = sums / rows.shape[0]
    upper = torch.ones(num_layers, num_layers, dtype=torch.bool).triu()
    return result.masked_fill(upper, math.nan)


def _mean_divergence(p: torch.Tensor, others: torch.Tensor, metric: str) -> torch.Tensor:
    """p: [n, Sq, Sk] one layer's probabilities; others: [J, n, Sq, Sk]. Returns [J]: the divergence of each
    of `others` from p, averaged over heads and query positions."""
    if metric == "js":
        m = 0.5 * (p + others)
        # xlogy(0, 0) = 0, so the causally masked zeros contribute nothing.
        kl_p = torch.xlogy(p, p) - torch.xlogy(p, m)
        kl_o = torch.xlogy(others, others) - torch.xlogy(others, m)
        per_query = 0.5 * (kl_p + kl_o).sum(-1)  # [J, n, Sq]
    else:
        per_query = 1.0 - torch.nn.functional.cosine_similarity(p.expand_as(others), others, dim=-1)
    return per_query.mean(dim=(-2, -1))
