"""O-AMFS (docs/algorithm.md, "Outer loop: O-AMFS weights"): weight each task's meta-gradient
by how much it agrees with the others.

Works on any [T, D] matrix of task vectors: the full gradients (exact exchange) or random
projections of them (sketch exchange), which preserve cosines approximately.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from amfs_dist.algorithms.learner import ParamLayout, block

AGREEMENTS = ("all", "last_block")  # outer.agreement


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
    if vectors.shape[0] == 1:
        return torch.ones(1, dtype=torch.float64, device=vectors.device)
    return agreement_from_gram(scaled_gram(vectors))


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


def block_gram(vectors: torch.Tensor, block: int) -> torch.Tensor:
    """The Gram matrix summed over fixed coordinate blocks in block order, each in float64.

    The same blocks give the same sum whoever computes them: the collective exchange's
    workers each compute some blocks (block_grams), the driver adds them in this order."""
    total = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64,
                        device=vectors.device)
    for part in block_grams(vectors, block):
        total += part
    return total


def block_grams(vectors: torch.Tensor, block: int) -> list[torch.Tensor]:
    """One float64 Gram matrix per `block` coordinates of the [T, p] vectors (float64 holds
    the squares of any float32 gradient: no overflow or underflow to 0 as in float32)."""
    parts = []
    for start in range(0, vectors.shape[1], block):
        rows = vectors[:, start:start + block].double()
        parts.append(rows @ rows.T)
    return parts


def agreement_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """a_i = 1/(T-1) sum_{j != i} cos(v_i, v_j) from the float64 Gram matrix of the v_i."""
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64, device=gram.device)
    gram = gram.double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    # a zero row's cosines are 0/tiny = 0: it agrees with nothing
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    cos = cos.clamp(-1.0, 1.0)  # rounding
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


def agreement_columns(layout: ParamLayout, agreement: str = "all") -> torch.Tensor | None:
    """The columns of a flattened gradient row that outer.agreement computes cosines from:
    None for all; for last_block, the encoder's last block and every head parameter (the
    head side of the network, where tasks that teach different mappings differ most, while
    the early layers' shared features agree for any labelling)."""
    if agreement == "all":
        return None
    if agreement != "last_block":
        raise ValueError(f"outer.agreement: unknown choice {agreement!r}")
    encoder = [n for n in layout.names if n.startswith("backbone.")]
    last = block(encoder[-1]) if encoder else None
    columns, start = [], 0
    for name, numel in zip(layout.names, layout.numels):
        if not name.startswith("backbone.") or block(name) == last:
            columns.append(torch.arange(start, start + numel))
        start += numel
    return torch.cat(columns)


def task_weights(vectors: torch.Tensor | None, weighting: str = "cosine", normalize: str = "clip",
                 temperature: float = 1.0, gram: torch.Tensor | None = None) -> TaskWeights:
    """The O-AMFS weights of T task vectors, or of their Gram matrix `gram` (then `vectors` is
    None); weighting='mean' gives plain averaging."""
    with torch.no_grad():
        if gram is not None:
            a = agreement_from_gram(gram)
        elif vectors is not None:
            a = agreement(vectors)
        else:
            raise ValueError("task_weights: needs the task vectors or their Gram matrix")
        if weighting == "mean":
            w = torch.full_like(a, 1.0 / a.numel())
        elif weighting == "cosine":
            w = weights_from_agreement(a, normalize, temperature)
        else:
            raise ValueError(f"outer.weighting: unknown weighting {weighting!r}")
    return TaskWeights(w, a)


def combine(grads: torch.Tensor, weights: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """G = sum_i w_i g_i. ordered: added one task after the other, each product and sum one
    rounded elementwise op, so any split of the coordinates gives the same bits (the
    deterministic mode); else one matrix product."""
    weights = weights.to(grads.dtype)
    if not ordered:
        return weights @ grads
    total = torch.zeros(grads.shape[1:], dtype=grads.dtype, device=grads.device)
    for row, w in zip(grads, weights):
        total.add_(row * w)
    return total
