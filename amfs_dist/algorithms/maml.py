"""MAML and FO-MAML inner loops (docs/algorithm.md, "Inner loop: MAML and FO-MAML"), written
for torch.func.

`adapt` takes any per-task loss(params, x, y); the meta-gradient of a query loss evaluated at
the adapted parameters is second order through the steps unless first_order is set, which
treats each inner gradient as a constant (FO-MAML).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad

Params = dict[str, torch.Tensor]


def adapt(loss_fn: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor], params: Params,
          x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, first_order: bool) -> Params:
    """`steps` plain SGD steps of loss_fn on (x, y) from params."""
    for _ in range(steps):
        grads = grad(loss_fn)(params, x, y)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = {k: p - lr * grads[k] for k, p in params.items()}
    return params
