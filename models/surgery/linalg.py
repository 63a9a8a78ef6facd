"""Linear algebra shared by the surgery methods: PCA of a projection's outputs, rotate_half frequency pairs.

Conventions (HF Llama/Mistral/Qwen2):
  * nn.Linear weights are [d_out, d_in]; a projection's output is y = W x + b.
  * RoPE rotates dims (f, f + d/2) of each head together with angle t * theta_f ("rotate_half" layout),
    theta_f = base^(-2f/d): f = 0 is the fastest-rotating (highest-frequency) pair. Seen as one complex
    number per pair, z_f = y[f] + i y[f + d/2], RoPE multiplies z_f by exp(i t theta_f); a complex scalar
    applied to z_f (a 2x2 scaled rotation of the two real dims) therefore commutes with RoPE.

Shapes: H model width (d_in), d head_dim, n heads, r rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Factorization:
    """y ~= up_weight @ (down_weight @ x + down_bias) + up_bias, a rank-r map in place of y = W x + b.

    eigenvalues: [d_out] float64, descending, of the (offset, scaled) output covariance that was
    diagonalised: sum(eigenvalues[r:]) is the expected squared reconstruction error of the scaled outputs.
    """

    down_weight: torch.Tensor            # [r, H]
    down_bias: Optional[torch.Tensor]    # [r]
    up_weight: torch.Tensor              # [d_out, r]
    up_bias: Optional[torch.Tensor]      # [d_out]
    eigenvalues: torch.Tensor            # [d_out]

    @property
    def rank(self) -> int:
        return self.down_weight.shape[0]


def principal_components(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, largest first: (eigenvalues [d], eigenvectors [d, d] as columns).

    Computed in float64; tiny negative eigenvalues from rounding are clamped to 0.
    """
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"second_moment must be a square matrix, got shape {tuple(second_moment.shape)}")
    sym = second_moment.to(torch.float64)
    sym = 0.5 * (sym + sym.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    return eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)


def factorize(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    second_moment: torch.Tensor,
    mean: torch.Tensor,
    rank: int,
    *,
    offset: Optional[torch.Tensor] = None,
    restore_offset: bool = False,
    scale: Optional[torch.Tensor] = None,
    metric: Optional[torch.Tensor] = None,
) -> Factorization:
    """The rank-`rank` PCA factorisation of y = weight @ x + bias given the moments of y.

    With o = offset (default 0) and D = diag(scale) (default I), the outputs are first shifted and scaled,
    y' = D (y - o), and projected on the top-r eigenvectors U of E[y' y'^T]:

        latent    c = U^T D (W x + b - o)                 down = U^T D W,  down_bias = U^T D (b - o)
        rebuilt   y ~= D^-1 U c  (+ o if restore_offset)   up = D^-1 U,     up_bias = o or None

    * offset = E[y], restore_offset=True: centred PCA, the optimal rank-r affine reconstruction (needs a
      bias on the up-projection).
    * offset = None: uncentred PCA, the optimal rank-r reconstruction with no bias anywhere after the
      latent. This is what RoPE'd keys need: a constant added to a key before RoPE turns into a
      position-dependent term after it, so it cannot be dropped or folded away.
    * offset given, restore_offset=False: the offset is removed and never added back; valid exactly where
      a constant shift of y changes nothing downstream, e.g. the non-rotary key dims (q . (k + c) shifts
      every logit of a query by the same q . c, and softmax ignores that).
    * scale weighs parts of y against each other (e.g. keys vs values in a joint latent).
    * metric M (symmetric PSD [d_out, d_out]) measures the error as E[(y - y^)^T M (y - y^)] instead of
      E|y - y^|^2: D = M^1/2 (a full matrix, `metric_sqrt`), and the formulas above hold with D^-1 the
      inverse square root. This is the generalised (whitened) PCA: with y' = D y the error is E|y' - y'^|^2,
      minimised over rank-r reconstructions of y' by its top-r principal directions, and the best rank-r map
      of x onto y under M is the same (the target W x has no component a rank-r map of x could add).
      `scale` is the diagonal case (M = diag(scale^2)); give at most one of the two.

    At rank = d_out the map is exact (U is orthogonal, D invertible). Biases come out None when nothing needs
    them. `eigenvalues` are those of the shifted, weighted moment D E[(y-o)(y-o)^T] D, so their tail is the
    weighted error.

    Args:
        weight: [d_out, H]; bias: [d_out] or None; second_moment: E[y y^T] [d_out, d_out]; mean: E[y] [d_out].
        rank: 1 <= rank <= d_out.

    Raises:
        ValueError: a rank out of range, mismatched shapes, a non-positive scale, or both scale and metric.
    """
    d_out = weight.shape[0]
    if not 1 <= rank <= d_out:
        raise ValueError(f"rank must be in [1, {d_out}] (the projection's output width), got {rank}")
    if second_moment.shape != (d_out, d_out) or mean.shape != (d_out,):
        raise ValueError(
            f"moments must be [{d_out}, {d_out}] and [{d_out}] for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(second_moment.shape)} and {tuple(mean.shape)}"
        )
    w = weight.detach().to(torch.float64)
    s = second_moment.to(torch.float64)
    m = mean.to(torch.float64)
    o = None if offset is None else offset.detach().to(torch.float64)
    if o is not None:
        # E[(y-o)(y-o)^T] = E[yy^T] - m o^T - o m^T + o o^T
        s = s - torch.outer(m, o) - torch.outer(o, m) + torch.outer(o, o)
    if scale is not None and metric is not None:
        raise ValueError("give factorize a diagonal `scale` or a full `metric`, not both")
    d = None if scale is None else scale.detach().to(torch.float64)
    if d is not None:
        if d.shape != (d_out,) or bool((d <= 0).any()):
            raise ValueError(f"scale must be [{d_out}] and positive, got shape {tuple(d.shape)}")
        s = d[:, None] * s * d[None, :]
    root = inverse_root = None
    if metric is not None:
        if metric.shape != (d_out, d_out):
            raise ValueError(f"metric must be [{d_out}, {d_out}] (the output width squared), got {tuple(metric.shape)}")
        root, inverse_root = metric_sqrt(metric)
        s = root @ s @ root
    eigenvalues, eigenvectors = principal_components(s)
    u = eigenvectors[:, :rank]                                             # [d_out, r]
    if root is not None:
        down_map = u.T @ root                                              # U^T M^1/2   [r, d_out]
    else:
        down_map = u.T if d is None else u.T * d[None, :]                 # U^T D    [r, d_out]
    down_weight = down_map @ w                                             # [r, H]
    shift = None
    if bias is not None:
        shift = bias.detach().to(torch.float64)
    if o is not None:
        shift = -o if shift is None else shift - o
    down_bias = None if shift is None else down_map @ shift
    if inverse_root is not None:
        up_weight = inverse_root @ u                                       # M^-1/2 U   [d_out, r]
    else:
        up_weight = u if d is None else u / d[:, None]                    # D^-1 U   [d_out, r]
    up_bias = o.clone() if (o is not None and restore_offset) else None
    dtype = weight.dtype
    return Factorization(
        down_weight=down_weight.to(dtype),
        down_bias=None if down_bias is None else down_bias.to(dtype),
        up_weight=up_weight.to(dtype),
        up_bias=None if up_bias is None else up_bias.to(dtype),
        eigenvalues=eigenvalues,
    )


def metric_sqrt(metric: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a symmetric PSD matrix, float64, with eigenvalues raised to at least floor * max.

    The floor keeps the inverse finite where M is (nearly) singular: a direction that nothing downstream reads
    (M v = 0) may then be reconstructed arbitrarily badly at no cost, which is right, but the up-projection
    must still exist. Relative to the largest eigenvalue so that it does not depend on M's units.

    Raises:
        ValueError: M not square, or with no positive eigenvalue.
    """
    if metric.ndim != 2 or metric.shape[0] != metric.shape[1]:
        raise ValueError(f"metric must be a square matrix, got shape {tuple(metric.shape)}")
    sym = metric.detach().to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (sym + sym.T))
    top = float(eigenvalues.max())
    if not top > 0:
        raise ValueError(f"metric must have a positive eigenvalue (a PSD weighting that weighs something), got max {top}")
    eigenvalues = eigenvalues.clamp_min(floor * top)
    root = (vectors * eigenvalues.sqrt()) @ vectors.T
    inverse_root = (vectors * eigenvalues.rsqrt()) @ vectors.T
    return root, inverse_root


def discarded_energy(eigenvalues: torch.Tensor, rank: int) -> float:
    """Fraction of the total eigen-energy a rank-`rank` projection leaves out (0 at full rank)."""
    total = float(eigenvalues.sum())
    return 0.0 if total <= 0 else float(eigenvalues[rank:].sum()) / total


def rank_for_energy(eigenvalues: torch.Tensor, threshold: float) -> int:
    """The smallest rank whose principal directions keep at least `threshold` of the total energy.

    Raises:
        ValueError: threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    total = float(eigenvalues.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(eigenvalues.to(torch.float64), 0) / total
    # 1e-12 of slack: a threshold of exactly 1.0 must reach full rank despite rounding in the cumsum.
    reached = torch.nonzero(kept >= threshold - 1e-12)
    return int(reached[0]) + 1 if len(reached) else eigenvalues.numel()


# ---------------------------------------------------------------------------------------------------
# rotate_half frequency pairs


def pair_energy(second_moment: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[n, d/2]: E[y_f^2 + y_{f+d/2}^2] per head and frequency pair, from E[y y^T] of a [n*d] projection output.

    The energy of a pair is unchanged by RoPE (a rotation), so pre-RoPE moments give post-RoPE energies.
    """
    if second_moment.shape != (num_heads * head_dim,) * 2:
        raise ValueError(f"second_moment must be [{num_heads * head_dim}]^2 for {num_heads} heads of {head_dim}, "
                         f"got {tuple(second_moment.shape)}")
    diag = torch.diagonal(second_moment).reshape(num_heads, head_dim).to(torch.float64)
    half = head_dim // 2
    return diag[:, :half] + diag[:, half:]


def complex_pair_moment(second_moment: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """[d/2, g, g] complex128: per frequency f, E[z z^H] over the g heads `heads`, z_h = y_h[f] + i y_h[f + d/2].

    E[z_h conj(z_h')] = E[a_h a_h'] + E[b_h b_h'] + i (E[b_h a_h'] - E[a_h b_h']), with a = first-half dim,
    b = second-half dim, all read from the real second moment E[y y^T] of the [n*d] output.
    """
    half = head_dim // 2
    s = second_moment.to(torch.float64)
    idx_a = torch.tensor([[h * head_dim + f for h in heads] for f in range(half)])  # [d/2, g]
    idx_b = idx_a + half
    aa = s[idx_a[:, :, None], idx_a[:, None, :]]
    bb = s[idx_b[:, :, None], idx_b[:, None, :]]
    ba = s[idx_b[:, :, None], idx_a[:, None, :]]
    ab = s[idx_a[:, :, None], idx_b[:, None, :]]
    moment = torch.complex(aa + bb, ba - ab)
    return 0.5 * (moment + moment.transpose(-1, -2).conj())


def scale_pairs(first: torch.Tensor, second: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (or bias entries) of the pair (a, b), seen as z = a + i b, multiplied by the complex `factor`.

    first, second: [d/2, ...] the rows producing y[f] and y[f + d/2]; factor: [d/2] complex.
    Returns the rows producing Re(c z) and Im(c z): (Re c) a - (Im c) b and (Im c) a + (Re c) b.
    """
    shape = (-1,) + (1,) * (first.ndim - 1)
    re = factor.real.reshape(shape).to(torch.float64)
    im = factor.imag.reshape(shape).to(torch.float64)
    a, b = first.to(torch.float64), second.to(torch.float64)
    return re * a - im * b, im * a + re * b
