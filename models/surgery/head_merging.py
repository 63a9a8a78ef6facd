"""KV-head merging (Yu et al. 2024, "Effectively Compress KV Heads for LLM", arXiv 2406.07056).

A layer with n_kv KV heads becomes an ordinary GQA layer with m < n_kv KV heads; q_proj and o_proj absorb
the change, so nothing but the K/V widths changes at inference.

Groups. Query head q (of n_q) reads old KV head h(q) = q // (n_q / n_kv) and, after merging, new head
j(q) = q // (n_q / m). New head j summarises the old heads S_j = {h(q) : j(q) = j}; when m divides n_kv
these are the contiguous blocks of n_kv / m heads (SmolLM2: 3 heads -> 1, S_0 = {0, 1, 2}).

Values. v_S = concat_{h in S_j} v_h ([g d]). PCA of E[v_S v_S^T] gives the d directions U [g d, d] that keep
the most energy; the merged head is v_j = U^T v_S (v_proj rows U^T W_S) and head h is rebuilt as
v_h ~= U_h v_j with U_h the d rows of U belonging to h. Attention is linear in V, so for a query head q
    o_proj_q (sum_t p_t v_h(t)) ~= (o_proj_q U_h) (sum_t p_t v_j(t))
and the reconstruction folds into o_proj's columns for q: O_q <- O_q U_h. Uncentred PCA: Llama's o_proj
has no bias to take the mean's contribution.

Keys, RoPE-aware. Per frequency pair f the key of head h is the complex number z_h = k_h[f] + i k_h[f+d/2]
and RoPE multiplies it by exp(i t theta_f), the same phase for every head. A complex-linear merge
z_j = sum_h conj(u_h) z_h (u in C^g) therefore commutes with RoPE, as does the rebuild z_h ~= u_h z_j. The
best unit u (least E|z - u u^H z|^2) is the top eigenvector of the Hermitian E[z z^H] (a complex PCA per
pair, derived from the real moments of the pre-RoPE keys; the phase of the moment is rotation invariant).
For a query head q, with q_f = q[f] + i q[f+d/2]:
    q . k_h = sum_f Re(conj(q_f) z_h,f) ~= sum_f Re(conj(q_f) u_h,f z_j,f) = sum_f Re(conj(q'_f) z_j,f),
    q'_f = conj(u_h,f) q_f,
a 2x2 scaled rotation of q_proj's rows (f, f+d/2) (and of q's bias), which again commutes with RoPE.

Weighting (SurgerySettings.balance="attention"): what matters is not the key or value error itself but
what the queries and o_proj make of it. Keys: each head's pair error is weighted by the energy of the
queries that read it (a real weight per head and pair keeps the transform complex-linear). Values: head
h's error e costs sum_q |O_q e|^2 = e^T M_h e, so the PCA runs on M_h^1/2 v. Both reduce to the plain PCA
when the weights are uniform, and stay exact for redundant heads.

Exactness. With m = n_kv each group has one head: U is a d x d rotation and u a unit phase, so the layer
computes the same function. When a group's heads are redundant (equal, or equal up to a per-pair complex
scale for keys / up to a linear map for values), the moments have rank d (values) and rank 1 per pair
(keys), and merging is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .base import Transform, kv_moments, q_pair_energy
from .linalg import complex_pair_moment, principal_components, scale_pairs


@dataclass(frozen=True)
class HeadGroups:
    """Which old KV heads each new KV head summarises, and which heads each query head reads."""

    old_of_query: tuple[int, ...]          # [n_q] old KV head read by each query head
    new_of_query: tuple[int, ...]          # [n_q] new KV head read by each query head
    members: tuple[tuple[int, ...], ...]   # [m] the old heads S_j merged into new head j (sorted)


def head_groups(num_attention_heads: int, num_kv_heads: int, num_merged_heads: int) -> HeadGroups:
    """Raises ValueError unless 1 <= m <= n_kv and both n_kv and m divide n_q."""
    n_q, n_kv, m = num_attention_heads, num_kv_heads, num_merged_heads
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"num_key_value_heads={n_kv} must divide num_attention_heads={n_q}")
    if not 1 <= m <= n_kv or n_q % m:
        divisors = [k for k in range(1, n_kv + 1) if n_q % k == 0]
        raise ValueError(f"merged num_kv_heads must divide num_attention_heads={n_q} and be at most "
                         f"the original {n_kv}; got {m}, expected one of {divisors}")
    old = tuple(q // (n_q // n_kv) for q in range(n_q))
    new = tuple(q // (n_q // m) for q in range(n_q))
    members = tuple(tuple(sorted({old[q] for q in range(n_q) if new[q] == j})) for j in range(m))
    return HeadGroups(old, new, members)


def _head_rows(head: int, head_dim: int) -> slice:
    return slice(head * head_dim, (head + 1) * head_dim)


def _readers(groups: HeadGroups, new_head: int, old_head: int) -> list[int]:
    """The query heads that read old head `old_head` through new head `new_head`."""
    return [q for q in range(len(groups.old_of_query))
            if groups.new_of_query[q] == new_head and groups.old_of_query[q] == old_head]


def _sqrt_psd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a PSD matrix, with eigenvalues floored at 1e-6 of the largest (M may be singular)."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    values = values.clamp_min(values.max().clamp_min(1e-30) * 1e-6)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def merge_values(
    v_weight: torch.Tensor, v_bias: Optional[torch.Tensor], v_second_moment: torch.Tensor,
    groups: HeadGroups, head_dim: int, o_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Merged v_proj and each query head's rebuild map.

    Args:
        v_weight: [n_kv d, H]; v_bias: [n_kv d] or None; v_second_moment: E[v v^T] [n_kv d, n_kv d].
        o_weight: [H, n_q d] to weigh the PCA by what o_proj makes of each value error: head h's error e
            costs sum_q |O_q e|^2 = e^T M_h e over the query heads q that read it, so the PCA runs on
            M_h^1/2 v_h and the rebuild maps back with M_h^-1/2 (None: plain PCA, M_h = I).

    Returns:
        (weight [m d, H], bias [m d] or None, rebuild [n_q, d, d]: v_old(q) ~= rebuild[q] @ v_new(q)).
    """
    n_q = len(groups.old_of_query)
    new_weight, new_bias = [], []
    rebuild_of_old: dict[tuple[int, int], torch.Tensor] = {}   # (new head, old head) -> U_h [d, d]
    s = v_second_moment.to(torch.float64)
    eye = torch.eye(head_dim, dtype=torch.float64)
    for j, heads in enumerate(groups.members):
        idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])   # [g d]
        half_metric, inverse = [], []
        for h in heads:
            if o_weight is None:
                half_metric.append(eye)
                inverse.append(eye)
                continue
            o = o_weight.to(torch.float64)
            metric = sum(o[:, q * head_dim:(q + 1) * head_dim].T @ o[:, q * head_dim:(q + 1) * head_dim]
                         for q in _readers(groups, j, h))
            root, inverse_root = _sqrt_psd(metric)
            half_metric.append(root)
            inverse.append(inverse_root)
        a = torch.block_diag(*half_metric)                                                   # [g d, g d]
        _, vectors = principal_components(a @ s[idx][:, idx] @ a.T)
        u = vectors[:, :head_dim]                                                            # [g d, d]
        down = u.T @ a                                                                       # [d, g d]
        new_weight.append(down @ v_weight.to(torch.float64)[idx])
        if v_bias is not None:
            new_bias.append(down @ v_bias.to(torch.float64)[idx])
        for position, h in enumerate(heads):
            rebuild_of_old[(j, h)] = inverse[position] @ u[position * head_dim:(position + 1) * head_dim]
    rebuild = torch.stack([rebuild_of_old[(groups.new_of_query[q], groups.old_of_query[q])] for q in range(n_q)])
    dtype = v_weight.dtype
    bias = torch.cat(new_bias).to(dtype) if v_bias is not None else None
    return torch.cat(new_weight).to(dtype), bias, rebuild


def fold_values_into_o_proj(o_weight: torch.Tensor, rebuild: torch.Tensor) -> torch.Tensor:
    """o_proj [H, n_q d] with each query head's d columns O_q replaced by O_q @ rebuild[q]."""
    n_q, d, _ = rebuild.shape
    if o_weight.shape[1] != n_q * d:
        raise ValueError(f"o_proj weight must be [H, {n_q * d}], got {tuple(o_weight.shape)}")
    blocks = o_weight.to(torch.float64).reshape(o_weight.shape[0], n_q, d)        # [H, n_q, d]
    folded = torch.einsum("hqd,qde->hqe", blocks, rebuild.to(torch.float64))
    return folded.reshape_as(o_weight).to(o_weight.dtype)


def merge_keys(
    k_weight: torch.Tensor, k_bias: Optional[torch.Tensor], k_second_moment: torch.Tensor,
    groups: HeadGroups, head_dim: int, q_pair_energy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Merged k_proj (RoPE-commuting, per frequency pair) and each query head's complex rebuild coefficients.

    Args:
        k_weight: [n_kv d, H]; k_bias: [n_kv d] or None; k_second_moment: E[k k^T] of the pre-RoPE keys.
        q_pair_energy: [n_q, d/2] E|q_f|^2 per query head and pair, to weigh each head's key error by the
            queries that read it (E|q . dk|^2 ~ sum_f E|q_f|^2 E|dz_f|^2, the query and key errors taken as
            uncorrelated): the complex PCA runs on sqrt(w_h) z_h with w_h the summed query energy of the
            readers of head h, and the rebuild divides it back out (None: w = 1, plain PCA).

    Returns:
        (weight [m d, H], bias [m d] or None, coefficients [n_q, d/2] complex128: z_old(q),f ~= c[q, f] z_new(q),f).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    n_q = len(groups.old_of_query)
    w = k_weight.to(torch.float64)
    b = None if k_bias is None else k_bias.to(torch.float64)
    new_weight, new_bias = [], []
    coefficient_of_old: dict[tuple[int, int], torch.Tensor] = {}
    for j, heads in enumerate(groups.members):
        moment = complex_pair_moment(k_second_moment, list(heads), head_dim)     # [d/2, g, g]
        if q_pair_energy is None:
            weight = torch.ones(half, len(heads), dtype=torch.float64)
        else:
            energy = q_pair_energy.to(torch.float64)
            weight = torch.stack([energy[_readers(groups, j, h)].sum(0) for h in heads], dim=1)  # [d/2, g]
            weight = weight.clamp_min(weight.max() * 1e-6 + 1e-30)
        root = weight.sqrt()
        moment = root[:, :, None] * moment * root[:, None, :]
        _, vectors = torch.linalg.eigh(moment)
        top = vectors[:, :, -1]                                                   # [d/2, g], unit, top eigenvalue
        # Merge z_j = sum_h conj(top_h) sqrt(w_h) z_h; rebuild z_h ~= (top_h / sqrt(w_h)) z_j.
        merge_factor = top.conj() * root                                          # [d/2, g]
        u = top / root                                                            # rebuild coefficients
        first = torch.zeros(half, w.shape[1], dtype=torch.float64)
        second = torch.zeros_like(first)
        bias_first = torch.zeros(half, dtype=torch.float64)
        bias_second = torch.zeros_like(bias_first)
        for position, h in enumerate(heads):
            rows = w[_head_rows(h, head_dim)]
            re, im = scale_pairs(rows[:half], rows[half:], merge_factor[:, position])
            first += re
            second += im
            if b is not None:
                hb = b[_head_rows(h, head_dim)]
                re_b, im_b = scale_pairs(hb[:half], hb[half:], merge_factor[:, position])
                bias_first += re_b
                bias_second += im_b
            coefficient_of_old[(j, h)] = u[:, position]
        new_weight.append(torch.cat([first, second]))
        new_bias.append(torch.cat([bias_first, bias_second]))
    coefficients = torch.stack([coefficient_of_old[(groups.new_of_query[q], groups.old_of_query[q])]
                                for q in range(n_q)])
    dtype = k_weight.dtype
    bias = torch.cat(new_bias).to(dtype) if k_bias is not None else None
    return torch.cat(new_weight).to(dtype), bias, coefficients


def fold_keys_into_q_proj(
    q_weight: torch.Tensor, q_bias: Optional[torch.Tensor], coefficients: torch.Tensor, head_dim: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q_proj rows (and bias) of each query head q with pair f multiplied by conj(coefficients[q, f])."""
    n_q, half = coefficients.shape
    if q_weight.shape[0] != n_q * head_dim or half * 2 != head_dim:
        raise ValueError(f"q_proj weight must have {n_q} x {head_dim} rows for coefficients {tuple(coefficients.shape)}, "
                         f"got {tuple(q_weight.shape)}")
    new_weight = q_weight.to(torch.float64).clone()
    new_bias = None if q_bias is None else q_bias.to(torch.float64).clone()
    for q in range(n_q):
        rows = _head_rows(q, head_dim)
        c = coefficients[q].conj()
        block = new_weight[rows]
        re, im = scale_pairs(block[:half], block[half:], c)
        new_weight[rows] = torch.cat([re, im])
        if new_bias is not None:
            hb = new_bias[rows]
            re_b, im_b = scale_pairs(hb[:half], hb[half:], c)
            new_bias[rows] = torch.cat([re_b, im_b])
    return new_weight.to(q_weight.dtype), None if new_bias is None else new_bias.to(q_bias.dtype)


# ---------------------------------------------------------------------------------------------------
# Surgery: the per-layer transform


def transform_layer(t: Transform, i: int, entry: dict[str, Any]) -> None:
    """Layer i (kv_proj="merged_heads", owning its cache): merged v_proj (and k_proj unless it is a probs_from
    consumer), with the rebuild maps folded into o_proj (and the key coefficients into q_proj). The fold is
    kept in `t.merged_folds` for the layers that read this layer's cache (`fold_into_reader`)."""
    layer, a, geometry = t.spec.layers[i], t.attn[i], t.geometry
    groups = head_groups(geometry.num_heads, geometry.num_kv_heads, layer.num_kv_heads)
    kv_second, _ = kv_moments(t.stats, i, a)
    n = geometry.kv_dims
    weighted = t.settings.balance == "attention"
    v_w, v_b, rebuild = merge_values(a.v_weight, a.v_bias, kv_second[n:, n:], groups, geometry.head_dim,
                                     o_weight=a.o_weight if weighted else None)
    t.put(i, "v_proj", v_w, v_b)
    t.put(i, "o_proj", fold_values_into_o_proj(a.o_weight, rebuild), a.o_bias)
    if layer.probs_from is None:
        k_w, k_b, coefficients = merge_keys(
            a.k_weight, a.k_bias, kv_second[:n, :n], groups, geometry.head_dim,
            q_pair_energy=q_pair_energy(t.stats, i, a, geometry) if weighted else None)
        t.put(i, "k_proj", k_w, k_b)
        q_w, q_b = fold_keys_into_q_proj(a.q_weight, a.q_bias, coefficients, geometry.head_dim)
        t.put(i, "q_proj", q_w, q_b)
        t.merged_folds[i] = (coefficients, rebuild)
    entry["kv"] = f"merged {geometry.num_kv_heads} -> {layer.num_kv_heads} heads"


def fold_into_reader(t: Transform, i: int, entry: dict[str, Any]) -> None:
    """Layer i reads a merged-heads producer's cache (kv_from): the producer's fold goes into its own q_proj
    and o_proj."""
    a = t.attn[i]
    coefficients, rebuild = t.merged_folds[t.spec.layers[i].kv_from]
    q_w, q_b = fold_keys_into_q_proj(a.q_weight, a.q_bias, coefficients, t.geometry.head_dim)
    t.put(i, "q_proj", q_w, q_b)
    t.put(i, "o_proj", fold_values_into_o_proj(a.o_weight, rebuild), a.o_bias)
    entry["kv"] += " (merged heads folded into q_proj / o_proj)"
