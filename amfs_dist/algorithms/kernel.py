"""I-AMFS math (docs/algorithm.md, "Inner loop: I-AMFS, a closed-form solve"): RBF and linear
kernels, the closed-form regularised solve, the information term.

Pure tensor functions over the last two dimensions, so they work per task under vmap and
batched over leading dimensions alike: no .item(), no data-dependent branches.
"""
from __future__ import annotations

import torch


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, log_bandwidth: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = exp(-||a_i - b_j||^2 / (2 sigma^2)), sigma = exp(log_bandwidth)."""
    sq = (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * a @ b.transpose(-1, -2)
    # rounding can make a distance slightly negative; it must not become a kernel value > 1
    sq = sq.clamp_min(0.0)
    return torch.exp(-sq * (0.5 * torch.exp(-2.0 * log_bandwidth)))


def linear_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = a_i . b_j: the solve is then ridge regression on the features (R2-D2)."""
    return a @ b.transpose(-1, -2)


def _identity_like(K: torch.Tensor) -> torch.Tensor:
    n = K.shape[-1]
    return torch.eye(n, dtype=K.dtype, device=K.device).expand_as(K)


def solve_coefficients(K: torch.Tensor, Y: torch.Tensor, lam: torch.Tensor | float,
                       mu: torch.Tensor | float) -> torch.Tensor:
    """alpha = ((I + 4 mu K) K + lam I)^-1 (I + 4 mu K) Y, by Cholesky.

    The minimiser of ||K a - Y||^2 + lam a^T K a + 4 mu r^T K r with r = K a - Y.
    mu = 0 is kernel ridge regression, (K + lam I)^-1 Y.
    """
    eye = _identity_like(K)
    M = eye + 4.0 * mu * K
    A = M @ K + lam * eye
    A = 0.5 * (A + A.transpose(-1, -2))  # exactly symmetric for the factorisation
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(M @ Y, L)


def inner_objective(alpha: torch.Tensor, K: torch.Tensor, Y: torch.Tensor,
                    lam: float, mu: float) -> torch.Tensor:
    """The inner objective J(alpha) of docs/algorithm.md, summed over output columns (for tests and diagnostics)."""
    r = K @ alpha - Y
    fit = (r * r).sum((-2, -1))
    ridge = (alpha * (K @ alpha)).sum((-2, -1))
    smooth = 4.0 * (r * (K @ r)).sum((-2, -1))
    return fit + lam * ridge + mu * smooth


def information_term(K: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """I(f; D) = 1/2 log det(I + K / lam), via the Cholesky factor's diagonal."""
    L, _ = torch.linalg.cholesky_ex(_identity_like(K) + K / lam)
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
