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


GRAM_CHUNK = 1 << 22  # elements of one scaled column block (16 MiB in float32)


def agreement(vectors: torch.Tensor) -> torch.Tensor:
    """a_i = 1/(T-1) sum_{j != i} cos(v_i, v_j); a single task agrees fully with itself (1).

    A zero vector has no direction: its cosines with every task are 0 (so is its agreement).
    """
    t = vectors.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64, device=vectors.device)
    gram = scaled_gram(vectors)
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    cos = cos.clamp(-1.0, 1.0)  # float32 rounding
    return (cos.sum(1) - cos.diagonal()) / (t - 1)


def scaled_gram(vectors: torch.Tensor) -> torch.Tensor:
    """The float64 Gram matrix of the rows divided by their largest |entry|: cosines are the
    same as the rows', but a float32 Gram of raw gradients overflows (NaN) at norms ~1e19 and
    underflows (0) below ~1e-22. Column blocks bound the scaled copy to GRAM_CHUNK elements."""
    t, p = vectors.shape
    scale = torch.linalg.vector_norm(vectors, ord=float("inf"), dim=1)  # exact in any dtype
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]  # zero rows stay 0
    gram = torch.zeros(t, t, dtype=torch.float64, device=vectors.device)
    step = max(1, GRAM_CHUNK // t)
    for start in range(0, p, step):
        block = vectors[:, start:start + step] / scale  # |entries| <= 1: no overflow
        gram += (block @ block.T).double()
    return gram


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
