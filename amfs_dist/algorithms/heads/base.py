"""The head interface: what a method adds on top of the encoder (docs/algorithm.md).

A head owns its meta-parameters (an nn.Module built from the config and the feature size) and
turns one task's support set into predictions for its queries. Everything here is per task and
vmap-safe: no .item(), no data-dependent branches.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from amfs_dist.config import Config

Params = dict[str, torch.Tensor]
# (the model's parameters, images, rows that give batch-norm statistics) -> features
Encoder = Callable[[Params, torch.Tensor, "int | None"], torch.Tensor]
Prediction = tuple[torch.Tensor, "torch.Tensor | float"]  # (outputs, loss penalty)

PREFIX = "head."  # the head's parameters' names in the learner's module


class Head(nn.Module):
    """A method's head. `params` given to adapt_predict holds every learnable tensor of the
    model by its name in the learner's module ("backbone.…", "head.…"), plus the head's
    constants (its buffers); `own(params)` picks the head's, without the prefix."""

    # test-time adaptation takes gradients (MAML): evaluation must not run under no_grad
    needs_grad_at_test: ClassVar[bool] = False

    def __init__(self, cfg: Config, features: int, regression: bool, ways: int):
        """features: the encoder's output size; ways: the classes the config trains on (only a
        head with a fixed-size output layer needs it)."""
        super().__init__()
        self.cfg = cfg
        self.regression = regression

    def adapt_predict(self, params: Params, encode: Encoder, xs: torch.Tensor, ys: torch.Tensor,
                      xq: torch.Tensor, ways: int, training: bool) -> Prediction:
        """Adapt to one task's support set (xs, ys), predict its queries xq: (outputs [q, ways]
        or [q, 1], a loss penalty added to the task's query loss)."""
        raise NotImplementedError

    def support_loss(self, params: Params, encode: Encoder, xs: torch.Tensor, ys: torch.Tensor,
                     ways: int) -> torch.Tensor:
        """The loss test-time fine-tuning lowers (eval.finetune_steps; docs/algorithm.md,
        "Test-time fine-tuning"), from the support set alone: by default leave-one-out, each
        support example predicted by adapt_predict from the others, so that a 1-shot set (whose
        left-out class has no other example) still gives a gradient."""
        losses = []
        for i in range(xs.shape[0]):  # the support size is static: a Python loop is vmap-safe
            rest = [j for j in range(xs.shape[0]) if j != i]
            out, _ = self.adapt_predict(params, encode, xs[rest], ys[rest], xs[i:i + 1], ways,
                                        training=False)
            losses.append(loss_and_accuracy(out, ys[i:i + 1], self.regression)[0])
        return torch.stack(losses).mean()


class FeatureHead(Head):
    """A head built from the support features alone (no gradient steps through the encoder):
    support and queries go through the encoder in one pass, then `predict` runs in float32."""

    def adapt_predict(self, params, encode, xs, ys, xq, ways, training):
        n_s = xs.shape[0]
        z = at_least_float32(encode(params, torch.cat([xs, xq]), n_s))
        with no_autocast(z.device):
            return self.predict(own(params), z[:n_s], ys, z[n_s:], ways, training)

    def predict(self, params: Params, zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor,
                ways: int, training: bool) -> Prediction:
        """params: the head's own (no prefix); zs [n, d], zq [q, d] features."""
        raise NotImplementedError

    def support_loss(self, params, encode, xs, ys, ways):
        """Leave-one-out as Head's, with the support encoded once (batch-norm statistics from
        the whole support set) and each example predicted from the others' features."""
        n = xs.shape[0]
        z = at_least_float32(encode(params, xs, n))
        rest = torch.tensor([[j for j in range(n) if j != i] for i in range(n)],
                            dtype=torch.long, device=z.device)  # [n, n - 1]
        with no_autocast(z.device):
            out = vmap(lambda zs, y, zq: self.predict(own(params), zs, y, zq, ways, False)[0])(
                z[rest], ys[rest], z[:, None])
        return loss_and_accuracy(out[:, 0], ys, self.regression)[0]

    def targets(self, ys: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot [n, ways] support labels (the values themselves for regression)."""
        return ys.to(dtype) if self.regression else one_hot(ys, ways, dtype)


def own(params: Params) -> Params:
    return {k[len(PREFIX):]: v for k, v in params.items() if k.startswith(PREFIX)}


def one_hot(y: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    return (y[:, None] == torch.arange(ways, device=y.device)).to(dtype)


def loss_and_accuracy(out: torch.Tensor, y: torch.Tensor,
                      regression: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy, or for regression the MSE and NaN."""
    if regression:
        return F.mse_loss(out, y.to(out.dtype)), torch.full((), float("nan"), device=out.device,
                                                             dtype=out.dtype)
    return F.cross_entropy(out, y), (out.argmax(-1) == y).to(out.dtype).mean()


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses and the heads' solves never run in half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def no_autocast(device: torch.device):
    """The heads' solves run in float32 whatever the encoder's precision."""
    return torch.autocast(device.type, enabled=False)
