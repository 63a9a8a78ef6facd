"""Low-rank KV from calibration statistics: Eigen Attention / Palu latents and MLA-style partial RoPE.

Both variants cache a short latent per token instead of the n_kv * d keys and values, and both are PCA of
the projection outputs over the calibration tokens (see `linalg.factorize` for the bias/mean algebra).

pre_rope_latent (Eigen Attention arXiv 2408.05646, Palu arXiv 2407.21118)
    k_lat = k_down x  [k_rank]      v_lat = v_down x  [v_rank]          cached: k_rank + v_rank
    k = k_up k_lat, rotated by RoPE at attention time; v = v_up v_lat.
    K is factorised uncentred (a pre-RoPE constant cannot be dropped, see `factorize`); V is centred and
    its mean restored through v_up's bias when the attention module has one, uncentred otherwise.

partial (MHA2MLA arXiv 2502.14837, TransMLA)
    Per KV head keep p of the d/2 rotary frequency pairs (d_rope = 2p dims: f and f + d/2 for each kept f)
    as ordinary RoPE'd keys (`k_rope`, cached as is); the other d - d_rope "nope" key dims of all heads and
    all value dims share one latent:
        c = kv_down x [kv_rank];  k_nope = k_up c;  v = v_up c               cached: kv_rank + n_kv d_rope
    The nope dims carry no position, so at decode k_up folds into the queries (q_nope^T k_up) and v_up into
    o_proj: attention runs on the latent directly, as in MLA. The joint PCA is of [k_nope; v]. Where kv_down
    has a bias the keys' mean is subtracted and not restored (a constant on the non-rotary key dims shifts
    every logit of a query equally, and softmax ignores it), so no rank is spent on it; the values' mean is
    restored when v_up has a bias to carry it. Without those biases the PCA is uncentred (still optimal for
    a bias-free latent).

    Shared rotary key (rope_shared; DeepSeek-V2/V3 MLA, TransMLA's RoRoPE idea): ONE rotary key of d_rope dims
    for every head, cached once, against d_rope rotary query dims per query head (q_rope); every head's whole
    key (d dims, unrotated) and value go through the joint latent (no RMSNorm on it, unlike DeepSeek: models/stock.py).
    RoPE at frequency f turns each head's pair f by the same angle, so a real mixing of the heads' pair-f
    components commutes with it: k_h,f = s_h k'_f + r_h,f with k'_f = sum_m a_m k_m,f stays exact under RoPE
    for the k'_f part. We pick the mixing per kept pair by a weighted PCA over the KV heads (`shared_rope_mixing`):
    C_f = E[k_.,f k_.,f^T] summed over the pair's two dims (the rotation-invariant part of the pair's
    covariance), weighted by w_h = sum_{j in g(h)} E|q_j,f|^2 (the queries that read head h's pair), so that
    the expected squared logit of what is left out, sum_h w_h E|r_h,f|^2, is least: its top eigenvector v gives
    a_m = v_m sqrt(w_m) and s_h = v_h / sqrt(w_h). The residual r_h,f is not dropped: it is moved into the
    latent with the rest of the key (that part of the logit loses its rotation, as MHA2MLA's non-rotary dims
    do); s_h scales query head j's q_rope rows. Then the joint PCA of [k - s k'; v] as for partial RoPE (keys'
    mean dropped, values' mean restored by v_up's bias). At rope_dims = d and full rank the layer is exact only
    if every pair's heads are proportional (one rank-1 component per pair); with n_kv = 1 it always is.

    Which pairs stay rotary (`select_rope_pairs`):
      "norm"    MHA2MLA's 2-norm criterion: by ||q_f|| ||k_f|| summed over the KV head's query heads,
                the Cauchy-Schwarz bound on the pair's contribution to the logits (norms are root mean
                squares over the calibration tokens, rotation invariant, so read from pre-RoPE moments);
      "high"    the p highest frequencies (f = 0..p-1);  "low" the p lowest;
      "uniform" p pairs evenly spaced over the spectrum.

Weighting (`balance`) of the PCA, so that the directions kept are the ones attention needs:
    "none"       plain PCA of the outputs;
    "trace"      (joint latent only) scale keys and values to the same total energy before the PCA;
    "attention"  weight each key pair by the root-mean-square of the queries that read it (summed over the
                 KV head's query heads, over sqrt(d): the logit error is q . dk / sqrt(d)) and each value dim
                 by the norm of the o_proj columns that read it (the output error is O dv).

Initialisation (`settings.INITS`, surgery setting `init`) of pre-RoPE latents and value-only latents:
    "pca"           the (balanced) PCA above: reconstruct K and V.
    "output_aware"  minimise what attention makes of the error rather than the error itself, a generalised
                    PCA under a metric M (linalg.factorize: latent = U^T M^1/2 y, rebuilt M^-1/2 U c, U the
                    top eigenvectors of M^1/2 E[yy^T] M^1/2, error E[e^T M e] = the discarded eigenvalues),
                    for keys and values as below.
    "output_aware_values"  values as below, keys by the PCA. On SmolLM2-135M this is the best of the three:
                    the key metric lowers each layer's own attention-output error (about 30% at the 25% budget's
                    ranks) but raises the compressed model's KL to the original; why is not understood
                    (docs/COMPRESSION.md, "Output-aware initialisation").
      keys   (`key_output_metric`): a pre-RoPE key error e_h of KV head h changes the logit of query head j
             (j in the group g(h) reading h) at lag D = t_q - t_k >= 0 by q_j^T R(-D) e_h / sqrt(d), R the
             RoPE rotation (RoPE sits after k_up, so the error is rotated with the key). Query and key come
             from different tokens, taken as independent, so summed over the group and averaged over lags
                 E[logit error^2] = e_h^T W_h e_h,   W_h = (1/d) sum_{j in g(h)} E_D[R(-D)^T E[q_j q_j^T] R(-D)]
             with D distributed as the causal (query, key) pairs of a context of T tokens, p(D) ~ T - D.
             Fast pairs average to their rotation-invariant energy (the "attention" balance's diagonal); slow
             pairs, which barely turn within T, keep the queries' full covariance. M = blockdiag_h(W_h),
             times `value_spread`'s rate (a scalar per reading layer: it moves no direction, it prices logit
             errors in output units so that the greedy budget can weigh keys against values).
      values (`value_output_metric`): the o_proj output error is sum_j O_j a_j, O_j query head j's d columns
             of o_proj and a_j its attention-weighted average of the value errors of KV head h(j). Query heads
             attending alike make the a_j equal per KV head, and M = O^T O with O = [sum_{j in g(h)} O_j]_h
             (every cross term); attending independently leaves M = blockdiag_h(sum_{j in g(h)} O_j^T O_j).
             With a correlation rho between the heads' averages, M = rho M_alike + (1 - rho) M_independent;
             rho = 1 (on SmolLM2-135M the compressed model's KL to the original was lowest at 1 of 0, 1/2, 1;
             docs/COMPRESSION.md).
    Exact at full rank like the PCA. Partial RoPE's joint latent [k_nope; v] (either output-aware init): one
    metric blockdiag(keys, values), keys by `nope_key_output_metric` (the non-rotary dims meet the query
    unrotated, so no lag average) times `value_spread`'s rate, values as above: the two parts of one latent must
    be priced in one currency, so "output_aware_values" weighs the keys too. Measured on SmolLM2-135M at 25% of
    the cache: docs/COMPRESSION.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..calibration import CalibrationStatistics
from ..configuration_kvforge import CompressionSpec, Geometry
from .base import DenseAttention, Transform, attention_prefix, kv_moments, q_pair_energy
from .linalg import Factorization, discarded_energy, factorize, pair_energy
from .settings import BALANCES, ROPE_PAIR_CRITERIA, SurgeryError, SurgerySettings


def select_rope_pairs(
    q_pair_energy: torch.Tensor, k_pair_energy: torch.Tensor, num_pairs: int, criterion: str = "norm",
) -> torch.Tensor:
    """[n_kv, p] long: the frequency pairs each KV head keeps rotary, ascending.

    Args:
        q_pair_energy: [n_q, d/2] mean squared norm of each query pair (see `linalg.pair_energy`).
        k_pair_energy: [n_kv, d/2] the same for keys.
        num_pairs: p = d_rope / 2, in [1, d/2].
        criterion: one of ROPE_PAIR_CRITERIA.

    Raises:
        ValueError: a bad criterion, p out of range, or energies of mismatched shapes.
    """
    n_q, half = q_pair_energy.shape
    n_kv = k_pair_energy.shape[0]
    if criterion not in ROPE_PAIR_CRITERIA:
        raise ValueError(f"rope pair criterion must be one of {ROPE_PAIR_CRITERIA}, got {criterion!r}")
    if k_pair_energy.shape[1] != half or n_q % n_kv:
        raise ValueError(f"query energies {tuple(q_pair_energy.shape)} and key energies {tuple(k_pair_energy.shape)} "
                         "must share d/2 and have n_kv dividing n_q")
    if not 1 <= num_pairs <= half:
        raise ValueError(f"rope_dims must be an even number in [2, {2 * half}] (head_dim), got {2 * num_pairs}")
    if criterion == "high":
        return torch.arange(num_pairs).expand(n_kv, num_pairs).clone()
    if criterion == "low":
        return torch.arange(half - num_pairs, half).expand(n_kv, num_pairs).clone()
    if criterion == "uniform":
        step = half / num_pairs
        return torch.tensor([int(i * step) for i in range(num_pairs)]).expand(n_kv, num_pairs).clone()
    q_norm = q_pair_energy.to(torch.float64).clamp_min(0).sqrt().reshape(n_kv, n_q // n_kv, half).sum(1)
    score = q_norm * k_pair_energy.to(torch.float64).clamp_min(0).sqrt()             # [n_kv, d/2]
    # Stable sort so ties (e.g. all-zero test weights) pick the lower (faster) frequency, deterministically.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_pairs]
    return order.sort(dim=1).values


def rope_dim_index(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n_kv, 2p] long: the head dims of the kept pairs, first halves then second halves
    ([f_1..f_p, f_1 + d/2..f_p + d/2]), so the kept sub-vector keeps the rotate_half layout. This is the order
    in which modeling_kvforge.partial_rope_dims reads k_rope's outputs; the non-rotary dims follow in ascending
    order (k_up's outputs), which for ascending pairs is `nope_dim_index`."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


def nope_dim_index(rope_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n_kv, d - 2p] long: the head dims not in `rope_index`, ascending."""
    keep = torch.ones(rope_index.shape[0], head_dim, dtype=torch.bool)
    keep.scatter_(1, rope_index, False)
    return torch.stack([torch.nonzero(row).flatten() for row in keep])


def flat_rows(dim_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n_kv * k] long: rows of a [n_kv * d, ...] projection picked per head by dim_index [n_kv, k]."""
    heads = torch.arange(dim_index.shape[0])[:, None]
    return (heads * head_dim + dim_index).flatten()


def key_pair_scale(q_pair_energy: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[n_kv, d] scale for the key dims: sqrt(sum over the KV head's query heads of E|q_f|^2 / d).

    The same weight for both dims of a pair, so weighting commutes with RoPE."""
    n_q, half = q_pair_energy.shape
    d = 2 * half
    energy = q_pair_energy.to(torch.float64).reshape(num_kv_heads, n_q // num_kv_heads, half).sum(1) / d
    scale = energy.clamp_min(0).sqrt()
    scale = scale.clamp_min(scale.max() * 1e-6 + 1e-30)  # a dead pair still needs a finite inverse
    return torch.cat([scale, scale], dim=1)


def value_dim_scale(o_weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[n_kv, d] scale for the value dims: the norm of the o_proj columns that read each dim, over the
    KV head's query heads (o_weight: [H, n_q d])."""
    n_q = o_weight.shape[1] // head_dim
    col = o_weight.to(torch.float64).pow(2).sum(0).reshape(num_kv_heads, n_q // num_kv_heads, head_dim).sum(1)
    scale = col.sqrt()
    return scale.clamp_min(scale.max() * 1e-6 + 1e-30)


@dataclass
class JointLatent:
    """One latent for the keys' unrotated dims and the values: its up rows stack k_up on v_up."""

    latent: Factorization                  # down: kv_down; up rows [:key_rows] = k_up, the rest = v_up
    key_rows: int                          # the rows k_up rebuilds

    @property
    def k_up_weight(self) -> torch.Tensor:
        return self.latent.up_weight[:self.key_rows]

    @property
    def v_up_weight(self) -> torch.Tensor:
        return self.latent.up_weight[self.key_rows:]

    @property
    def v_up_bias(self) -> Optional[torch.Tensor]:
        return None if self.latent.up_bias is None else self.latent.up_bias[self.key_rows:]


@dataclass(kw_only=True)
class PartialRopeFactors(JointLatent):
    """The parameters of a partial-RoPE layer (names as in docs/ARCHITECTURE.md); key_rows = n_kv * (d - d_rope)."""

    k_rope_weight: torch.Tensor            # [n_kv * d_rope, H]
    k_rope_bias: Optional[torch.Tensor]
    rope_pairs: torch.Tensor               # [n_kv, d_rope / 2] frequency pairs kept rotary (the `rope_index` buffer)


def partial_rope_factors(
    *,
    k_weight: torch.Tensor, k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor, v_bias: Optional[torch.Tensor],
    kv_second_moment: torch.Tensor, kv_mean: torch.Tensor,
    q_pair_energy: torch.Tensor, num_kv_heads: int, head_dim: int,
    rope_dims: int, kv_rank: int, criterion: str = "norm",
    restore_value_mean: bool = False, drop_key_mean: bool = False, balance: str = "none",
    o_weight: Optional[torch.Tensor] = None, key_metric: Optional[torch.Tensor] = None,
    value_metric: Optional[torch.Tensor] = None,
) -> PartialRopeFactors:
    """Split keys into rotary dims and a joint [k_nope; v] latent of rank kv_rank.

    Args:
        kv_second_moment / kv_mean: moments of the concatenated pre-RoPE [k; v] ([2 n_kv d]).
        q_pair_energy: [n_q, d/2] query pair energies (for the "norm" criterion and "attention" balance).
        restore_value_mean: centre the values and give v_up a bias (needs the module to have one).
        drop_key_mean: subtract the non-rotary keys' mean before the PCA and never add it back (exact up to
            a per-query logit shift; needs a bias on kv_down to subtract it).
        o_weight: [H, n_q d], needed for balance="attention".
        key_metric, value_metric: the output-aware init (both or neither; they replace `balance`): [n_kv d]^2
            metrics of the keys' errors (nope_key_output_metric, in output units) and of the values' errors
            (value_output_metric); the joint latent is the generalised PCA under blockdiag(key_metric restricted
            to the non-rotary dims, value_metric).

    Raises:
        ValueError: bad rope_dims, rank, criterion or balance.
    """
    if (key_metric is None) != (value_metric is None):
        raise ValueError("partial_rope_factors takes key_metric and value_metric together")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if rope_dims % 2:
        raise ValueError(f"rope_dims must be even (whole rotate_half pairs), got {rope_dims}")
    n_k = num_kv_heads * head_dim
    k_second = kv_second_moment[:n_k, :n_k]
    pairs = select_rope_pairs(q_pair_energy, pair_energy(k_second, num_kv_heads, head_dim), rope_dims // 2, criterion)
    rope_index = rope_dim_index(pairs, head_dim)
    rope_rows = flat_rows(rope_index, head_dim)
    nope_rows = flat_rows(nope_dim_index(rope_index, head_dim), head_dim)
    # Joint output y = [k_nope; v]: its moments are a sub-block of the [k; v] moments.
    joint_rows = torch.cat([nope_rows, n_k + torch.arange(num_kv_heads * head_dim)])
    second = kv_second_moment[joint_rows][:, joint_rows]
    mean = kv_mean[joint_rows]
    weight = torch.cat([k_weight[nope_rows], v_weight])
    bias = None
    if k_bias is not None or v_bias is not None:
        bias = torch.cat([k_bias[nope_rows] if k_bias is not None else torch.zeros(len(nope_rows), dtype=k_weight.dtype),
                          v_bias if v_bias is not None else torch.zeros(v_weight.shape[0], dtype=v_weight.dtype)])
    n_nope = len(nope_rows)
    offset = mean.clone()
    if not drop_key_mean:
        offset[:n_nope] = 0.0
    if not restore_value_mean:
        offset[n_nope:] = 0.0
    if not (drop_key_mean or restore_value_mean):
        offset = None
    scale = None
    if balance == "trace":
        energy_k = float(torch.diagonal(second)[:n_nope].sum() - (mean[:n_nope] ** 2).sum() * drop_key_mean)
        energy_v = float(torch.diagonal(second)[n_nope:].sum())
        ratio = math.sqrt(energy_v / energy_k) if energy_k > 0 and energy_v > 0 else 1.0
        scale = torch.cat([torch.full((n_nope,), ratio, dtype=torch.float64), torch.ones(weight.shape[0] - n_nope, dtype=torch.float64)])
    elif balance == "attention":
        if o_weight is None:
            raise ValueError("balance='attention' needs o_weight")
        k_scale = key_pair_scale(q_pair_energy, num_kv_heads).flatten()[nope_rows]
        scale = torch.cat([k_scale, value_dim_scale(o_weight, num_kv_heads, head_dim).flatten()])
    metric = None
    if key_metric is not None:
        metric, scale = torch.block_diag(key_metric[nope_rows][:, nope_rows], value_metric), None
    latent = factorize(weight, bias, second, mean, kv_rank, offset=offset, restore_offset=False, scale=scale,
                       metric=metric)
    if restore_value_mean:
        # Only the values' part of the offset comes back; the keys' part is dropped (softmax shift).
        latent.up_bias = torch.cat([torch.zeros(n_nope, dtype=torch.float64), mean[n_nope:].to(torch.float64)]).to(weight.dtype)
    return PartialRopeFactors(
        k_rope_weight=k_weight[rope_rows].clone(),
        k_rope_bias=None if k_bias is None else k_bias[rope_rows].clone(),
        latent=latent, rope_pairs=pairs, key_rows=n_nope,
    )


@dataclass(kw_only=True)
class SharedRopeFactors(JointLatent):
    """The parameters of a shared-rotary (rope_shared) layer beyond q_proj and o_proj; key_rows = n_kv * d."""

    q_rope_weight: torch.Tensor            # [n_q * d_rope, H]
    q_rope_bias: Optional[torch.Tensor]
    k_rope_weight: torch.Tensor            # [d_rope, H]
    k_rope_bias: Optional[torch.Tensor]
    rope_pairs: torch.Tensor               # [1, d_rope / 2] (the `rope_index` buffer)


def shared_rope_pairs(q_pair_energy: torch.Tensor, k_pair_energy: torch.Tensor, num_pairs: int,
                      criterion: str = "norm") -> torch.Tensor:
    """[1, p] long: the frequency pairs the one shared rotary key keeps, ascending. "norm" sums MHA2MLA's per-head
    score ||q_f|| ||k_f|| over the KV heads (every head reads the shared pairs); the fixed criteria as
    `select_rope_pairs` ("high" and "uniform" give pairs DeepSeek's stock RoPE can express, models/stock.py)."""
    n_kv, half = k_pair_energy.shape
    if criterion != "norm":
        return select_rope_pairs(q_pair_energy, k_pair_energy, num_pairs, criterion)[:1]
    if not 1 <= num_pairs <= half:
        raise ValueError(f"rope_dims must be an even number in [2, {2 * half}] (head_dim), got {2 * num_pairs}")
    n_q = q_pair_energy.shape[0]
    q_norm = q_pair_energy.to(torch.float64).clamp_min(0).sqrt().reshape(n_kv, n_q // n_kv, half).sum(1)
    score = (q_norm * k_pair_energy.to(torch.float64).clamp_min(0).sqrt()).sum(0)        # [d/2]
    order = torch.sort(score, descending=True, stable=True).indices[:num_pairs]
    return order.sort().values[None]


def shared_rope_mixing(k_second_moment: torch.Tensor, q_pair_energy: torch.Tensor, pairs: torch.Tensor,
                       num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s), each [p, n_kv] float64: the shared rotary key of pair f is k'_f = sum_m a[f, m] k_m,f, and KV head h
    reads s[f, h] k'_f in its place (module doc: the query-weighted PCA over heads of the pair's covariance).

    k_second_moment: E[k k^T] [n_kv d, n_kv d] of the pre-RoPE keys; q_pair_energy [n_q, d/2]; pairs [1, p]."""
    half = head_dim // 2
    n_q = q_pair_energy.shape[0]
    weight = q_pair_energy.to(torch.float64).reshape(num_kv_heads, n_q // num_kv_heads, half).sum(1)  # [n_kv, d/2]
    heads = torch.arange(num_kv_heads) * head_dim
    a = torch.empty(pairs.shape[1], num_kv_heads, dtype=torch.float64)
    s = torch.empty_like(a)
    second = k_second_moment.to(torch.float64)
    for i, f in enumerate(pairs[0].tolist()):
        first, other = heads + f, heads + f + half
        covariance = second[first][:, first] + second[other][:, other]              # [n_kv, n_kv]
        w = weight[:, f].clamp_min(weight[:, f].max() * 1e-6 + 1e-30).sqrt()        # a dead head stays finite
        top = torch.linalg.eigh(w[:, None] * covariance * w[None, :]).eigenvectors[:, -1]
        top = top if top.sum() >= 0 else -top                                        # deterministic sign
        a[i], s[i] = top * w, top / w
    return a, s


def shared_rope_factors(
    *,
    q_weight: torch.Tensor, q_bias: Optional[torch.Tensor],
    k_weight: torch.Tensor, k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor, v_bias: Optional[torch.Tensor],
    kv_second_moment: torch.Tensor, kv_mean: torch.Tensor,
    q_pair_energy: torch.Tensor, num_kv_heads: int, head_dim: int,
    rope_dims: int, kv_rank: int, criterion: str = "norm",
    key_metric: Optional[torch.Tensor] = None, value_metric: Optional[torch.Tensor] = None,
    mixing: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> SharedRopeFactors:
    """One rotary key shared by every head plus a joint latent of every head's key residual and value.

    Args:
        q_weight / q_bias: the query projection [n_q d, H] (q_rope's rows are scaled copies of its rotary rows).
        kv_second_moment / kv_mean: moments of the concatenated pre-RoPE [k; v] ([2 n_kv d]).
        key_metric, value_metric: the output-aware init (both or neither), [n_kv d]^2 each: the key metric on
            every key dim (the residual meets the query unrotated, like the non-rotary dims).
        mixing: (a, s) [p, n_kv] in place of `shared_rope_mixing`'s (for comparisons: e.g. the heads' mean).

    Raises:
        ValueError: bad rope_dims, rank or criterion.
    """
    if (key_metric is None) != (value_metric is None):
        raise ValueError("shared_rope_factors takes key_metric and value_metric together")
    if rope_dims % 2:
        raise ValueError(f"rope_dims must be even (whole rotate_half pairs), got {rope_dims}")
    n_k = num_kv_heads * head_dim
    n_q = q_weight.shape[0] // head_dim
    group = n_q // num_kv_heads
    k_second = kv_second_moment[:n_k, :n_k]
    pairs = shared_rope_pairs(q_pair_energy, pair_energy(k_second, num_kv_heads, head_dim), rope_dims // 2, criterion)
    a, s = shared_rope_mixing(k_second, q_pair_energy, pairs, num_kv_heads, head_dim) if mixing is None else mixing
    dims = rope_dim_index(pairs, head_dim)[0]                                         # [d_rope] head dims
    a, s = torch.cat([a, a]).to(torch.float64), torch.cat([s, s]).to(torch.float64)   # per rotary dim, both halves
    # T maps [k; v] to [k - s k'; v] (the residual keys the latent holds): y = T [k; v], E[y y^T] = T E T^T.
    transform = torch.eye(2 * n_k, dtype=torch.float64)
    for r, d in enumerate(dims.tolist()):
        rows = torch.arange(num_kv_heads) * head_dim + d
        transform[rows[:, None], rows[None, :]] -= s[r][:, None] * a[r][None, :]
    weight64 = torch.cat([k_weight, v_weight]).to(torch.float64)
    bias64 = None
    if k_bias is not None or v_bias is not None:
        bias64 = torch.cat([k_bias if k_bias is not None else torch.zeros(n_k, dtype=k_weight.dtype),
                            v_bias if v_bias is not None else torch.zeros(n_k, dtype=v_weight.dtype)]).to(torch.float64)
    second = transform @ kv_second_moment.to(torch.float64) @ transform.T
    mean = transform @ kv_mean.to(torch.float64)
    metric = None if key_metric is None else torch.block_diag(key_metric, value_metric)
    dtype = k_weight.dtype
    # Centred: the keys' mean is dropped (every latent key dim meets the query unrotated, so it shifts all of a
    # query's logits alike), the values' mean comes back through v_up's bias.
    latent = factorize((transform @ weight64).to(dtype), None if bias64 is None else (transform @ bias64).to(dtype),
                       second, mean, kv_rank, offset=mean, restore_offset=False, metric=metric)
    latent.up_bias = torch.cat([torch.zeros(n_k, dtype=torch.float64), mean[n_k:]]).to(dtype)
    rope_rows = torch.arange(num_kv_heads)[None, :] * head_dim + dims[:, None]       # [d_rope, n_kv]
    k_rope_weight = (a[:, :, None] * k_weight.to(torch.float64)[rope_rows]).sum(1)
    k_rope_bias = None if k_bias is None else (a * k_bias.to(torch.float64)[rope_rows]).sum(1)
    # Query head j (KV head h = j // group): s[., h] times its own rotary rows.
    q_rows = torch.arange(n_q)[:, None] * head_dim + dims[None, :]                    # [n_q, d_rope]
    q_scale = s.T[torch.arange(n_q) // group]                                         # [n_q, d_rope]
    q_rope_weight = (q_scale[:, :, None] * q_weight.to(torch.float64)[q_rows]).reshape(n_q * rope_dims, -1)
    q_rope_bias = None if q_bias is None else (q_scale * q_bias.to(torch.float64)[q_rows]).flatten()
    def cast(t):
        return None if t is None else t.to(dtype)
    return SharedRopeFactors(
        q_rope_weight=cast(q_rope_weight), q_rope_bias=cast(q_rope_bias), k_rope_weight=cast(k_rope_weight),
        k_rope_bias=cast(k_rope_bias), latent=latent, rope_pairs=pairs, key_rows=n_k)


def pre_rope_factors(
    *, weight: torch.Tensor, bias: Optional[torch.Tensor], second_moment: torch.Tensor, mean: torch.Tensor,
    rank: int, restore_mean: bool, scale: Optional[torch.Tensor] = None, metric: Optional[torch.Tensor] = None,
) -> Factorization:
    """One projection (k or v) as down/up of rank `rank`; keys must use restore_mean=False (uncentred).

    scale: a diagonal weighting (`balance`); metric: a full one (`init="output_aware"`); at most one."""
    return factorize(weight, bias, second_moment, mean, rank,
                     offset=mean if restore_mean else None, restore_offset=restore_mean, scale=scale, metric=metric)


# ---------------------------------------------------------------------------------------------------
# Output-aware metrics (init="output_aware"; the math is in the module doc)


def rope_lag_moments(inv_freq: torch.Tensor, context_tokens: int) -> tuple[torch.Tensor, ...]:
    """(CC, CS, SS) [d/2, d/2] float64: E_D[cos(a_f) cos(a_g)], E_D[cos(a_f) sin(a_g)], E_D[sin(a_f) sin(a_g)]
    with a_f = -D theta_f, the key's rotation relative to its query, over lags D = 0..T-1 weighted like the
    causal (query, key) pairs of T tokens, p(D) = (T - D) / (T (T + 1) / 2).

    Raises:
        ValueError: context_tokens < 1.
    """
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1 (the context the lags are averaged over), got {context_tokens}")
    lags = torch.arange(context_tokens, dtype=torch.float64)
    p = (context_tokens - lags) / (context_tokens * (context_tokens + 1) / 2)         # [T]
    angle = -lags[:, None] * inv_freq.to(torch.float64)[None, :]                      # [T, d/2]
    cos, sin = angle.cos(), angle.sin()
    weighted_cos, weighted_sin = cos * p[:, None], sin * p[:, None]
    return weighted_cos.T @ cos, weighted_cos.T @ sin, weighted_sin.T @ sin


def lag_averaged_rotation(moment: torch.Tensor, lag_moments: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """E_D[R^T A R] [d, d] for A = `moment` [d, d] and R the rotate_half RoPE rotation by a_f = -D theta_f.

    R = [[C, -S], [S, C]] (C = diag cos a, S = diag sin a, blocks of d/2 dims). Each block of R^T A R is a sum of
    terms diag(u) A_ab diag(w), i.e. A_ab * (u w^T) elementwise, whose average over D needs only the lag moments.
    """
    cc, cs, ss = lag_moments
    sc = cs.T
    half = moment.shape[0] // 2
    a = moment.to(torch.float64)
    a11, a12, a21, a22 = a[:half, :half], a[:half, half:], a[half:, :half], a[half:, half:]
    b11 = a11 * cc + a12 * cs + a21 * sc + a22 * ss
    b12 = -a11 * cs + a12 * cc - a21 * ss + a22 * sc
    b21 = -a11 * sc - a12 * ss + a21 * cc + a22 * cs
    b22 = a11 * ss - a12 * sc - a21 * cs + a22 * cc
    return torch.cat([torch.cat([b11, b12], 1), torch.cat([b21, b22], 1)], 0)


def key_output_metric(q_second_moment: torch.Tensor, num_kv_heads: int, head_dim: int, inv_freq: torch.Tensor,
                      context_tokens: int) -> torch.Tensor:
    """[n_kv d, n_kv d] float64: blockdiag_h W_h, W_h = (1/d) sum_{j in g(h)} E_D[R(-D)^T E[q_j q_j^T] R(-D)].

    e^T M e is the mean squared logit error, summed over query heads, that a pre-RoPE key error e causes
    (module doc). q_second_moment: E[q q^T] [n_q d, n_q d] of the (pre-RoPE) queries; inv_freq: [d/2] theta_f.

    Raises:
        ValueError: shapes that do not fit n_q = k n_kv heads of head_dim, or inv_freq not [d/2].
    """
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"inv_freq must be [{head_dim // 2}] (head_dim / 2 RoPE frequencies), got {tuple(inv_freq.shape)}")
    lag_moments = rope_lag_moments(inv_freq, context_tokens)
    blocks = [lag_averaged_rotation(summed, lag_moments) for summed in _query_moments_per_kv_head(
        q_second_moment, num_kv_heads, head_dim)]
    metric = torch.block_diag(*blocks) / head_dim
    return 0.5 * (metric + metric.T)


def _query_moments_per_kv_head(q_second_moment: torch.Tensor, num_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """[d, d] float64 per KV head h: sum over its query heads j of E[q_j q_j^T].

    Raises:
        ValueError: q_second_moment not [n_q d, n_q d] with n_q a multiple of num_kv_heads.
    """
    n_q = q_second_moment.shape[0] // head_dim
    if q_second_moment.shape != (n_q * head_dim,) * 2 or n_q % num_kv_heads or n_q == 0:
        raise ValueError(f"q_second_moment must be [n_q * {head_dim}]^2 with n_q a multiple of {num_kv_heads} KV heads, "
                         f"got {tuple(q_second_moment.shape)}")
    group = n_q // num_kv_heads
    return [sum(q_second_moment[j * head_dim:(j + 1) * head_dim, j * head_dim:(j + 1) * head_dim].to(torch.float64)
                for j in range(h * group, (h + 1) * group)) for h in range(num_kv_heads)]


def nope_key_output_metric(q_second_moment: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[n_kv d, n_kv d] float64: blockdiag_h (1/d) sum_{j in g(h)} E[q_j q_j^T], the mean squared logit error,
    summed over query heads, that an error e in non-rotary key dims causes (e^T M e on those dims' rows).

    The non-rotary dims of a partial-RoPE layer meet the query unrotated, so no lag average applies
    (key_output_metric is this metric averaged over RoPE's rotations)."""
    metric = torch.block_diag(*_query_moments_per_kv_head(q_second_moment, num_kv_heads, head_dim)) / head_dim
    return 0.5 * (metric + metric.T)


def value_spread(o_weight: torch.Tensor, v_second_moment: torch.Tensor, v_mean: torch.Tensor, num_kv_heads: int,
                 head_dim: int) -> torch.Tensor:
    """[n_q] float64: c_j = E|O_j (v_h(j) - E v_h(j))|^2 = tr(O_j^T O_j Cov(v_h(j))), the exchange rate from a
    squared logit error of query head j to its squared output error.

    To first order in the logit errors d_t, softmax moves head j's output by sum_t p_t (d_t - d_mean) O_j v_t
    = sum_t p_t (d_t - d_mean) O_j (v_t - v_mean); for errors independent across keys its expected square is
    about sum_t p_t^2 E[d^2] c_j, while value errors e_t give sum_t p_t^2 E|O_j e|^2: the common sum_t p_t^2
    cancels, so c_j E[d^2] and E|O_j e|^2 are in the same units. o_weight [H, n_q d]; v moments [n_kv d].
    """
    n_q = o_weight.shape[1] // head_dim
    group = n_q // num_kv_heads
    cov = v_second_moment.to(torch.float64) - torch.outer(v_mean.to(torch.float64), v_mean.to(torch.float64))
    o = o_weight.detach().to(torch.float64)
    spread = torch.empty(n_q, dtype=torch.float64)
    for j in range(n_q):
        h = j // group
        o_j = o[:, j * head_dim:(j + 1) * head_dim]                                            # [H, d]
        block = cov[h * head_dim:(h + 1) * head_dim, h * head_dim:(h + 1) * head_dim]
        spread[j] = torch.trace(o_j @ block @ o_j.T).clamp_min(0.0)
    return spread


VALUE_HEAD_CORRELATION = 1.0


def value_output_metric(o_weight: torch.Tensor, num_kv_heads: int, head_dim: int,
                        head_correlation: float = VALUE_HEAD_CORRELATION) -> torch.Tensor:
    """[n_kv d, n_kv d] float64: rho O^T O + (1 - rho) blockdiag_h sum_{j in g(h)} O_j^T O_j, with
    O_j = o_weight[:, j d:(j+1) d] and O = [sum_{j in g(h)} O_j]_h (each KV head's query heads' columns summed).

    e^T M e is the expected squared o_proj output error that a value error e causes when the query heads'
    attention averages correlate by rho = head_correlation (1: all heads attend alike, 0: independently; module
    doc). o_weight: [H, n_q d].

    Raises:
        ValueError: o_weight's width not a multiple of n_kv * head_dim, or rho outside [0, 1].
    """
    if o_weight.ndim != 2 or o_weight.shape[1] % (num_kv_heads * head_dim):
        raise ValueError(f"o_weight must be [H, n_q * {head_dim}] with n_q a multiple of {num_kv_heads}, "
                         f"got {tuple(o_weight.shape)}")
    if not 0.0 <= head_correlation <= 1.0:
        raise ValueError(f"head_correlation must be in [0, 1], got {head_correlation}")
    n_q = o_weight.shape[1] // head_dim
    group = n_q // num_kv_heads
    o = o_weight.detach().to(torch.float64).reshape(o_weight.shape[0], n_q, head_dim)          # [H, n_q, d]
    independent = torch.block_diag(
        *torch.einsum("xjd,xje->jde", o, o).reshape(num_kv_heads, group, head_dim, head_dim).sum(1))
    summed = o.reshape(o_weight.shape[0], num_kv_heads, group, head_dim).sum(2).reshape(o_weight.shape[0], -1)
    alike = summed.T @ summed
    return head_correlation * alike + (1.0 - head_correlation) * independent


# ---------------------------------------------------------------------------------------------------
# Surgery: the PCA problem of every low-rank matrix of a spec, and the per-layer transform


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
    return f"{attention_prefix(layer)}v_up.bias" in expected


def _has_kv_down_bias(expected: Mapping[str, torch.Size], layer: int) -> bool:
    # The non-rotary keys' mean can only be subtracted (and dropped) through a bias on kv_down.
    return f"{attention_prefix(layer)}kv_down.bias" in expected


def _key_scale(stats, layer, attn, geometry, settings) -> Optional[torch.Tensor]:
    if settings.balance != "attention":
        return None
    return key_pair_scale(q_pair_energy(stats, layer, attn, geometry), geometry.num_kv_heads).flatten()


def _value_scale(attn, geometry, settings) -> Optional[torch.Tensor]:
    if settings.balance != "attention":
        return None
    return value_dim_scale(attn.o_weight, geometry.num_kv_heads, geometry.head_dim).flatten()


def _output_metric(stats: CalibrationStatistics, spec: CompressionSpec, attn: list[DenseAttention], layer: int,
                   part: str, geometry: Geometry, settings: SurgerySettings, rope_inv_freq: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
    """The output-aware metric of `layer`'s key ("k"), value ("v") or partial-RoPE non-rotary key ("kv_nope")
    latent, or None where the init is the PCA (init="pca"; pre-RoPE keys under init="output_aware_values").

    Every layer that attends over this layer's cache adds its own term (its queries for keys, its o_proj for
    values): the layer itself and its kv_from consumers, each with its own input statistics.
    """
    if settings.init == "pca" or (part == "k" and settings.init == "output_aware_values"):
        return None
    readers = [layer] + [c for c, l in enumerate(spec.layers) if l.kv_from == layer]
    if part == "v":
        return sum(value_output_metric(attn[r].o_weight, geometry.num_kv_heads, geometry.head_dim)
                   for r in readers)
    if part == "kv_nope":  # a partial-RoPE joint latent's keys meet the query unrotated: no RoPE frequencies
        def logit_metric(q_second):
            return nope_key_output_metric(q_second, geometry.num_kv_heads, geometry.head_dim)
    else:
        if rope_inv_freq is None:
            raise SurgeryError("surgery.init='output_aware' needs the model's RoPE frequencies for the key metric "
                               "(compress reads them from model.model.rotary_emb.inv_freq)")
        context = settings.context_tokens or stats.seq_len

        def logit_metric(q_second):
            return key_output_metric(q_second, geometry.num_kv_heads, geometry.head_dim, rope_inv_freq, context)
    kv_second, kv_mean = kv_moments(stats, layer, attn[layer])
    n = geometry.kv_dims
    metric = 0
    for r in readers:
        q_second, _ = stats.output_moments(r, attn[r].q_weight, attn[r].q_bias)
        # Logit units -> output units (value_spread), so keys and values share the greedy's currency.
        # One rate per reading layer (the mean over its query heads): a scalar leaves the key directions as the
        # logit metric chooses them (per-head rates gave worse layer outputs on SmolLM2), it only prices them.
        rate = value_spread(attn[r].o_weight, kv_second[n:, n:], kv_mean[n:], geometry.num_kv_heads,
                            geometry.head_dim).mean()
        metric = metric + rate * logit_metric(q_second)
    return metric


def _pre_rope(stats, layer, attn, geometry, settings, part: str, rank: int, restore_mean: bool,
              metric: Optional[torch.Tensor] = None):
    # An output-aware metric replaces the diagonal `balance` weighting (it contains it as its rotation average).
    kv_second, kv_mean = kv_moments(stats, layer, attn)
    n = geometry.kv_dims
    if part == "k":
        return pre_rope_factors(weight=attn.k_weight, bias=attn.k_bias, second_moment=kv_second[:n, :n],
                                mean=kv_mean[:n], rank=rank, restore_mean=False, metric=metric,
                                scale=None if metric is not None else _key_scale(stats, layer, attn, geometry, settings))
    return pre_rope_factors(weight=attn.v_weight, bias=attn.v_bias, second_moment=kv_second[n:, n:],
                            mean=kv_mean[n:], rank=rank, restore_mean=restore_mean, metric=metric,
                            scale=None if metric is not None else _value_scale(attn, geometry, settings))


def _partial_metrics(stats, spec, attn, layer: int, geometry, settings) -> dict[str, Optional[torch.Tensor]]:
    """The joint latent's output-aware metrics (keys and values both: the two parts of one latent must be priced
    in one currency, so "output_aware_values" weighs the keys too), or none under init="pca"."""
    if settings.init == "pca":
        return {"key_metric": None, "value_metric": None}
    return {"key_metric": _output_metric(stats, spec, attn, layer, "kv_nope", geometry, settings, None),
            "value_metric": _output_metric(stats, spec, attn, layer, "v", geometry, settings, None)}


def _partial(stats, layer, attn, geometry, settings, rope_dims: int, rank: int, restore_mean: bool,
             drop_key_mean: bool, metrics: Mapping[str, Optional[torch.Tensor]]):
    kv_second, kv_mean = kv_moments(stats, layer, attn)
    return partial_rope_factors(
        k_weight=attn.k_weight, k_bias=attn.k_bias, v_weight=attn.v_weight, v_bias=attn.v_bias,
        kv_second_moment=kv_second, kv_mean=kv_mean, q_pair_energy=q_pair_energy(stats, layer, attn, geometry),
        num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim, rope_dims=rope_dims, kv_rank=rank,
        criterion=settings.rope_pair_criterion, restore_value_mean=restore_mean, drop_key_mean=drop_key_mean,
        balance=settings.balance, o_weight=attn.o_weight, **metrics)


def _shared_rope(stats, layer, attn, geometry, settings, rope_dims: int, rank: int,
                 metrics: Mapping[str, Optional[torch.Tensor]]) -> SharedRopeFactors:
    kv_second, kv_mean = kv_moments(stats, layer, attn)
    return shared_rope_factors(
        q_weight=attn.q_weight, q_bias=attn.q_bias, k_weight=attn.k_weight, k_bias=attn.k_bias,
        v_weight=attn.v_weight, v_bias=attn.v_bias, kv_second_moment=kv_second, kv_mean=kv_mean,
        q_pair_energy=q_pair_energy(stats, layer, attn, geometry), num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim, rope_dims=rope_dims, kv_rank=rank, criterion=settings.rope_pair_criterion,
        **metrics)


def low_rank_problems(spec: CompressionSpec, stats: CalibrationStatistics, attn: list[DenseAttention],
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
        elif layer.rope_shared:
            f = _shared_rope(stats, i, attn[i], geometry, settings, layer.rope_dims, 1,
                             _partial_metrics(stats, spec, attn, i, geometry, settings))
            problems.append(LowRankProblem(i, "kv", f.latent.eigenvalues, f.latent.up_weight.shape[0]))
        else:
            f = _partial(stats, i, attn[i], geometry, settings, layer.rope_dims, 1, restore, _has_kv_down_bias(expected, i),
                         _partial_metrics(stats, spec, attn, i, geometry, settings))
            problems.append(LowRankProblem(i, "kv", f.latent.eigenvalues, f.latent.up_weight.shape[0]))
    return problems


def balanced_for_rounding(f: Factorization, stats: CalibrationStatistics, layer: int) -> Factorization:
    """The same map with every latent channel scaled to unit RMS on the calibration data: down rows divided, up
    columns multiplied, so it is exact before rounding. A low-bit cache rounds all channels of a token with one
    absmax scale; PCA channels fall off by orders of magnitude, and unbalanced, every channel's rounding error is a
    step of the largest one. Balanced, each channel's error is a step of a channel of its own size."""
    second, _ = stats.output_moments(layer, f.down_weight, f.down_bias)
    rms = second.diagonal().clamp_min(1e-30).sqrt().to(f.down_weight.dtype)
    return dataclasses.replace(
        f, down_weight=f.down_weight / rms[:, None], down_bias=None if f.down_bias is None else f.down_bias / rms,
        up_weight=f.up_weight * rms[None, :])


def transform_layer(t: Transform, i: int, entry: dict[str, Any]) -> None:
    """Layer i (kv_proj="low_rank", owning its cache): its latent projections, factorised at the spec's ranks.

    A probs_from consumer (shared attention) keeps a value latent only; otherwise pre-RoPE K and V latents,
    or partial RoPE's rotary dims plus a joint latent.
    """
    layer, a = t.spec.layers[i], t.attn[i]
    stats, geometry, settings = t.stats, t.geometry, t.settings
    restore = _restore_value_mean(t.expected, i)

    balance = layer.cache_bits is not None and (settings.low_bit_balance == "all" or (
        settings.low_bit_balance == "auto" and layer.cache_bits == 4))

    if layer.cache_bits is not None:
        entry["balanced_for_rounding"] = balance

    def for_cache(f: Factorization) -> Factorization:
        return balanced_for_rounding(f, stats, i) if balance else f

    if layer.probs_from is not None:
        f = for_cache(_pre_rope(stats, i, a, geometry, settings, "v", layer.v_rank, restore,
                                _output_metric(stats, t.spec, t.attn, i, "v", geometry, settings, t.rope_inv_freq)))
        t.put(i, "v_down", f.down_weight, f.down_bias)
        t.put(i, "v_up", f.up_weight, f.up_bias)
        entry["kv"] = f"v latent {layer.v_rank}"
        entry["init"] = settings.init
        entry["v_discarded"] = discarded_energy(f.eigenvalues, layer.v_rank)
    elif layer.rope == "pre_rope_latent":
        fk = for_cache(_pre_rope(stats, i, a, geometry, settings, "k", layer.k_rank, restore,
                                 _output_metric(stats, t.spec, t.attn, i, "k", geometry, settings, t.rope_inv_freq)))
        fv = for_cache(_pre_rope(stats, i, a, geometry, settings, "v", layer.v_rank, restore,
                                 _output_metric(stats, t.spec, t.attn, i, "v", geometry, settings, t.rope_inv_freq)))
        t.put(i, "k_down", fk.down_weight, fk.down_bias)
        t.put(i, "k_up", fk.up_weight, fk.up_bias)
        t.put(i, "v_down", fv.down_weight, fv.down_bias)
        t.put(i, "v_up", fv.up_weight, fv.up_bias)
        entry["kv"] = f"pre-RoPE latents k {layer.k_rank} v {layer.v_rank}"
        entry["init"] = settings.init
        entry["k_discarded"] = discarded_energy(fk.eigenvalues, layer.k_rank)
        entry["v_discarded"] = discarded_energy(fv.eigenvalues, layer.v_rank)
    else:  # one joint latent for the unrotated key dims and the values, beside rotary keys
        metrics = _partial_metrics(stats, t.spec, t.attn, i, geometry, settings)
        if layer.rope_shared:
            f = _shared_rope(stats, i, a, geometry, settings, layer.rope_dims, layer.kv_rank, metrics)
            t.put(i, "q_rope", f.q_rope_weight, f.q_rope_bias)
            kind = "shared rotary key"
        else:
            f = _partial(stats, i, a, geometry, settings, layer.rope_dims, layer.kv_rank, restore,
                         _has_kv_down_bias(t.expected, i), metrics)
            f.latent = for_cache(f.latent)  # (the shared-rotary latent is RMS-normed: scaling it is not exact)
            kind = "partial RoPE"
        t.put(i, "k_rope", f.k_rope_weight, f.k_rope_bias)
        t.put(i, "kv_down", f.latent.down_weight, f.latent.down_bias)
        t.put(i, "k_up", f.k_up_weight)
        t.put(i, "v_up", f.v_up_weight, f.v_up_bias)
        t.out[f"{attention_prefix(i)}rope_index"] = f.rope_pairs
        entry["kv"] = f"{kind} {layer.rope_dims} dims + latent {layer.kv_rank}"
        entry["init"] = "pca" if settings.init == "pca" else "output_aware"  # keys and values: one currency
        entry["kv_discarded"] = discarded_energy(f.latent.eigenvalues, layer.kv_rank)
        entry["rope_pairs"] = f.rope_pairs.tolist()
