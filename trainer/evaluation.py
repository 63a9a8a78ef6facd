"""Perplexity of a causal LM over packed rows of token ids.

Every row is a full window of real tokens (trainer/data.py packs documents without padding), so each
row of length L gives L - 1 next-token predictions and all of them count. The result is the
token-weighted mean negative log-likelihood over every prediction of every row evaluated (on all ranks
together when distributed), and its exp.

Shapes: B batch rows, L sequence length, V vocabulary size.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Logits are turned into float32 log-probabilities this many elements at a time: a batch of 4 x 512
# SmolLM2 logits is 100M values (400 MB in float32), and bf16 logits cast whole would double that.
LOSS_CHUNK_ELEMENTS = 1 << 24


def next_token_nll_sum(logits_BLV: torch.Tensor, input_ids_BL: torch.Tensor) -> torch.Tensor:
    """Sum over all rows and positions t < L-1 of -log p(input_ids[t+1] | logits[t]), in float64.

    Computed in float32 chunk by chunk over positions, so the float32 copy of the logits never exists
    whole (cross-entropy needs the log-sum-exp over V in full precision).
    """
    B, L, V = logits_BLV.shape
    if input_ids_BL.shape != (B, L):
        raise ValueError(f"logits {tuple(logits_BLV.shape)} do not match input_ids {tuple(input_ids_BL.shape)}")
    positions_per_chunk = max(1, LOSS_CHUNK_ELEMENTS // (B * V))
    total = torch.zeros((), dtype=torch.float64, device=logits_BLV.device)
    for start in range(0, L - 1, positions_per_chunk):
        end = min(start + positions_per_chunk, L - 1)
        logits_BCV = logits_BLV[:, start:end].float()
        targets_BC = input_ids_BL[:, start + 1:end + 1]
        nll = F.cross_entropy(logits_BCV.reshape(-1, V), targets_BC.reshape(-1), reduction="sum")
        total += nll.double()
    return total


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    # An HF model in eval mode would otherwise fill a KV cache that nobody reads.
    try:
        accepts_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts_use_cache = False
    return {"use_cache": False} if accepts_use_cache else {}


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    rows: torch.Tensor,
    batch_size: int,
    device: Union[str, torch.device],
    max_batches: Optional[int] = None,
    *,
    distributed: bool = False,
) -> dict[str, float]:
    """Token-weighted mean next-token NLL of `model` over `rows`, and its perplexity.

    Args:
        model: already on `device` (or wrapped by DeepSpeed); called as ``model(input_ids=...)`` and read
            through ``.logits`` [B, L, V] -- any Hugging Face causal LM or module with that contract.
        rows: [N, L] integer token ids, this rank's share of the eval set (L >= 2).
        batch_size: rows per forward pass; the last batch may be smaller.
        device: where each batch is sent.
        max_batches: evaluate at most this many batches (of this rank); None = all rows.
        distributed: sum NLL and token counts over all ranks (torch.distributed all_reduce), so every
            rank returns the same global numbers. Under ZeRO-3 every rank must run the same number of
            batches (each forward gathers parameters from all ranks): give ranks equal row counts.

    Returns:
        {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": predictions counted}.

    Raises:
        ValueError: rows not [N, L>=2] integers, no rows, batch_size or max_batches < 1, or a model
            whose logits do not cover the rows' tokens.
    """
    if rows.ndim != 2 or rows.shape[1] < 2 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"rows must be integer token ids of shape [N, L >= 2], got {rows.dtype} {tuple(rows.shape)}")
    if rows.shape[0] == 0:
        raise ValueError("rows is empty: there is nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")

    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int) and int(rows.max()) >= vocab_size:
        # Checked before the forward: an embedding lookup past its table fails with an unhelpful IndexError.
        raise ValueError(f"rows hold token id {int(rows.max())} but the model's vocabulary has {vocab_size} "
                         "tokens: wrong tokenizer for this model?")
    was_training = model.training
    model.eval()
    kwargs = _forward_kwargs(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = -(-rows.shape[0] // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    tokens = 0
    try:
        for b in range(n_batches):
            input_ids_BL = rows[b * batch_size:(b + 1) * batch_size].to(device=device, dtype=torch.long)
            logits_BLV = model(input_ids=input_ids_BL, **kwargs).logits
            if logits_BLV.shape[:2] != input_ids_BL.shape:
                raise ValueError(f"model returned logits of shape {tuple(logits_BLV.shape)} for input_ids "
                                 f"{tuple(input_ids_BL.shape)}; expected [B, L, V]")
            if b == 0 and int(rows.max()) >= logits_BLV.shape[-1]:
                raise ValueError(f"rows hold token id {int(rows.max())} but the model has only "
                                 f"{logits_BLV.shape[-1]} logits: wrong tokenizer for this model?")
            nll_sum += next_token_nll_sum(logits_BLV, input_ids_BL)
            tokens += input_ids_BL.shape[0] * (input_ids_BL.shape[1] - 1)
            del logits_BLV
    finally:
        model.train(was_training)

    if distributed:
        totals = torch.stack([nll_sum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        nll_sum, tokens = totals[0], int(totals[1].item())
    loss = nll_sum.item() / tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf  # math.exp overflows past ~709.8
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
