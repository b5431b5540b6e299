"""Prototypical networks (Snell et al. 2017): a query's logit for class k is minus its squared
Euclidean distance to c_k, the mean of class k's support features.

Pure tensor functions over the last two dimensions (vmap-safe, batched alike).
"""
from __future__ import annotations

import torch


def prototypes(z_support: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """c_k = mean of the support features of class k: [ways, d] from z [n, d], onehot [n, ways]."""
    # an episode has >= 1 shot per class; a leave-one-out support set (test-time fine-tuning)
    # may not: an empty class's prototype is the origin, not 0/0
    counts = onehot.sum(-2).clamp_min(1.0)
    return (onehot.transpose(-1, -2) @ z_support) / counts[..., :, None]


def logits(z_query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """-||z_q - c_k||^2, [q, ways]."""
    sq = ((z_query * z_query).sum(-1)[..., :, None] + (protos * protos).sum(-1)[..., None, :]
          - 2.0 * z_query @ protos.transpose(-1, -2))
    return -sq.clamp_min(0.0)  # rounding can make a distance slightly negative
