"""The count sketch behind `dist.exchange=sketch`: a seeded random projection R^P -> R^d.

Coordinate p goes to bucket h(p) in [0, d) with sign s(p) in {-1, +1}: S(g)_k = sum_{h(p)=k}
s(p) g_p. Only h and s are stored (P int64 + P float32: ~150 MB for ResNet-12's 12M
parameters), never a P x d matrix, and applying it is one pass over the gradient.

Why it serves the cosine weights: for any x, y, E[<Sx, Sy>] = <x, y> and
Var[<Sx, Sy>] = (1/d) (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_p x_p^2 y_p^2) <= 2 ||x||^2 ||y||^2 / d,
so each cosine of sketched gradients is within a few sqrt(2/d) of the exact one (about 0.044
per standard deviation at d = 1024), whatever P is.

h and s come from a torch CPU generator seeded by (run seed, a fixed tag) alone, so every
worker, on any device, holds the same sketch: sketches of tasks computed on different workers
are comparable. The sketch is fixed for the run.
"""
from __future__ import annotations

import numpy as np
import torch

_SKETCH_TAG = 0x5EC7C4  # separates the sketch's random stream from every other use of the seed
CHUNK = 1 << 20          # coordinates per pass: bounds the temporary to [t, CHUNK]


def sketch_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _SKETCH_TAG]).generate_state(1, np.uint64)[0] >> 1)


class CountSketch:
    def __init__(self, size: int, dim: int, seed: int, device: str | torch.device = "cpu"):
        if dim < 1:
            raise ValueError(f"dist.sketch_dim: must be >= 1, got {dim}")
        self.size, self.dim, self.seed = int(size), int(dim), int(seed)
        gen = torch.Generator(device="cpu").manual_seed(sketch_seed(seed))
        buckets = torch.randint(0, self.dim, (self.size,), generator=gen, dtype=torch.int64)
        signs = torch.randint(0, 2, (self.size,), generator=gen, dtype=torch.int8)
        self.device = torch.device(device)
        self.buckets = buckets.to(self.device)
        self.signs = (signs.to(torch.float32) * 2 - 1).to(self.device)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """[t, P] -> [t, d] (float32, on the rows' device)."""
        if rows.shape[-1] != self.size:
            raise ValueError(f"sketch of size {self.size} applied to vectors of size {rows.shape[-1]}")
        rows = rows.to(self.device)
        out = torch.zeros(rows.shape[0], self.dim, dtype=torch.float32, device=self.device)
        for start in range(0, self.size, CHUNK):
            stop = min(start + CHUNK, self.size)
            out.index_add_(1, self.buckets[start:stop],
                           rows[:, start:stop].float() * self.signs[start:stop])
        return out
