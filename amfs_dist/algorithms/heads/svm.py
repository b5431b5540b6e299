"""MetaOptNet-SVM's head (`inner=svm`, method `metaoptnet`; Lee et al. 2019): a multi-class
linear SVM (Crammer-Singer) on the support features, solved in the dual by a fixed number of
accelerated projected-gradient steps, and differentiated through those steps.

docs/algorithm.md, "Inner loop: MetaOptNet-SVM" states the dual and the solver. The functions
work per task over the last two dimensions (vmap-safe, batched alike).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from amfs_dist.algorithms.heads.base import FeatureHead


def project_rows_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto {b >= 0, sum(b) = 1} (Held, Wolfe and Crowder's
    sort-based rule): max(v - theta, 0), with theta from the largest entries that stay."""
    ways = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    excess = torch.cumsum(u, dim=-1) - 1.0
    rank = torch.arange(1, ways + 1, dtype=v.dtype, device=v.device)
    # the entries that stay positive are a prefix of the sorted row: count them (at least the
    # largest; a NaN row counts none, and must give NaN, which the trainer drops, not an error)
    kept = (u - excess / rank > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = torch.gather(excess, -1, kept - 1) / kept.to(v.dtype)
    return torch.clamp_min(v - theta, 0.0)


def dual_objective(beta: torch.Tensor, K: torch.Tensor, Y: torch.Tensor, c: float) -> torch.Tensor:
    """g(beta) = c/2 tr((Y - beta)^T K (Y - beta)) + <beta, Y> = n - D(alpha) / c, where D is
    the Crammer-Singer dual objective and beta = Y - alpha / c (for tests and diagnostics)."""
    a = Y - beta
    return 0.5 * c * (a * (K @ a)).sum((-2, -1)) + (beta * Y).sum((-2, -1))


def solve_dual(K: torch.Tensor, Y: torch.Tensor, c: float, steps: int) -> torch.Tensor:
    """The dual coefficients alpha [n, ways] of the Crammer-Singer SVM with Gram matrix K [n, n]
    and one-hot labels Y: `steps` FISTA steps on g over rows of beta in the simplex, from
    beta = Y (alpha = 0). w_k = sum_n alpha_nk z_n."""
    # 1/L with L = c ||K||_F >= c lambda_max(K), the Lipschitz constant of g's gradient
    step = 1.0 / (c * torch.linalg.matrix_norm(K)[..., None, None]).clamp_min(1e-12)
    beta = momentum = Y
    t = 1.0
    for _ in range(steps):
        gradient = Y - c * (K @ (Y - momentum))
        nxt = project_rows_to_simplex(momentum - step * gradient)
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        momentum = nxt + ((t - 1.0) / t_next) * (nxt - beta)
        beta, t = nxt, t_next
    return c * (Y - beta)


class SVMHead(FeatureHead):
    """One meta-parameter: a scale on the SVM's scores w_k . z (Lee et al.'s learned
    temperature, starting at 1). The support features are used as the encoder gives them."""

    def __init__(self, cfg, features, regression, ways):
        super().__init__(cfg, features, regression, ways)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def predict(self, params, zs, ys, zq, ways, training):
        svm = self.cfg.svm
        alpha = solve_dual(zs @ zs.transpose(-1, -2), self.targets(ys, ways, zs.dtype),
                           svm.c, svm.steps)
        return params["scale"] * ((zq @ zs.transpose(-1, -2)) @ alpha), 0.0
