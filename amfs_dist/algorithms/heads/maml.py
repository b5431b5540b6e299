"""MAML's head (`inner=maml`; `inner=fomaml` for FO-MAML): a linear layer on the encoder, and
gradient steps on the support loss through all of it. docs/algorithm.md, "Inner loop: MAML and
FO-MAML"; the steps are amfs_dist/algorithms/maml.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfs_dist.algorithms import maml
from amfs_dist.algorithms.heads.base import PREFIX, Head, at_least_float32, loss_and_accuracy
from amfs_dist.errors import UserError


class MAMLHead(Head):
    """A linear output layer (weight, bias): data.ways logits, or one output for regression.
    Its size is fixed by data.ways, so a model tests on as many ways as it trained on."""

    needs_grad_at_test = True
    first_order = False

    def __init__(self, cfg, features, regression, ways):
        super().__init__(cfg, features, regression, ways)
        linear = nn.Linear(features, 1 if regression else ways)  # its initialisation
        self.weight, self.bias = linear.weight, linear.bias

    def adapt_predict(self, params, encode, xs, ys, xq, ways, training):
        if not self.regression and ways != self.weight.shape[0]:
            raise UserError(f"data.ways: a MAML model has one output per class; this one was "
                            f"built for {self.weight.shape[0]} ways, not {ways}")

        def outputs(p, x, n_stats):
            h = encode(p, x, n_stats)
            return at_least_float32(F.linear(h, p[PREFIX + "weight"], p[PREFIX + "bias"]))

        def support_loss(p, x, y):
            return loss_and_accuracy(outputs(p, x, None), y, self.regression)[0]

        steps = self.cfg.maml.steps if training else self.cfg.maml.test_steps
        fast = maml.adapt(support_loss, params, xs, ys, steps, self.cfg.maml.lr,
                          first_order=self.first_order)
        n_s = xs.shape[0]
        return outputs(fast, torch.cat([xs, xq]), n_s)[n_s:], 0.0


class FirstOrderMAMLHead(MAMLHead):
    """FO-MAML: each inner gradient is a constant in the meta-gradient."""

    first_order = True
