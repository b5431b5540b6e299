"""O-AMFS (DESIGN 1.2): weight each task's meta-gradient by how much it agrees with the others.

Works on any [T, D] matrix of task vectors: the full gradients (exact exchange) or random
projections of them (sketch exchange), which preserve cosines approximately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskWeights:
    weights: torch.Tensor    # [T], sums to 1, constants (no gradient)
    agreement: torch.Tensor  # [T], a_i = mean cosine with the other tasks, in [-1, 1]

    def summary(self) -> dict:
        w = self.weights.double()
        entropy = -(w * torch.log(w.clamp_min(1e-30))).sum()
        return {"weights": [round(float(v), 6) for v in w],
                "weight_entropy": float(entropy),
                "agreement_min": float(self.agreement.min()),
                "agreement_max": float(self.agreement.max())}


def agreement(vectors: torch.Tensor) -> torch.Tensor:
    """a_i = 1/(T-1) sum_{j != i} cos(v_i, v_j); a single task agrees fully with itself (1)."""
    t = vectors.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64, device=vectors.device)
    # the T x T Gram matrix in the vectors' own precision (no float64 copy of T x P), then
    # the normalisation in float64
    gram = (vectors @ vectors.T).double()
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-30)
    cos = (gram / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)  # float32 rounding
    return (cos.sum(1) - cos.diagonal()) / (t - 1)


def weights_from_agreement(a: torch.Tensor, normalize: str = "clip",
                           temperature: float = 1.0) -> torch.Tensor:
    if normalize == "clip":
        positive = a.clamp_min(0.0)
        total = positive.sum()
        uniform = torch.full_like(a, 1.0 / a.numel())
        return torch.where(total > 0, positive / total.clamp_min(1e-30), uniform)
    if normalize == "softmax":
        return torch.softmax(a / temperature, dim=0)
    raise ValueError(f"outer.normalize: unknown normalisation {normalize!r}")


def task_weights(vectors: torch.Tensor, weighting: str = "cosine", normalize: str = "clip",
                 temperature: float = 1.0) -> TaskWeights:
    """The O-AMFS weights of T task vectors; weighting='mean' gives plain averaging."""
    with torch.no_grad():
        a = agreement(vectors)
        if weighting == "mean":
            w = torch.full_like(a, 1.0 / a.numel())
        elif weighting == "cosine":
            w = weights_from_agreement(a, normalize, temperature)
        else:
            raise ValueError(f"outer.weighting: unknown weighting {weighting!r}")
    return TaskWeights(w, a)


def combine(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """G = sum_i w_i g_i."""
    return weights.to(grads.dtype) @ grads
