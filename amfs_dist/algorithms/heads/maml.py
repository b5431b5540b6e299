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
        self.check_ways(ways)

        def loss(p, x, y):
            return self.support_loss(p, encode, x, y, ways)

        steps = self.cfg.maml.steps if training else self.cfg.maml.test_steps
        fast = maml.adapt(loss, params, xs, ys, steps, self.cfg.maml.lr,
                          first_order=self.first_order)
        n_s = xs.shape[0]
        return self.outputs(fast, encode, torch.cat([xs, xq]), n_s)[n_s:], 0.0

    def support_loss(self, params, encode, xs, ys, ways):
        """MAML's own inner-loop loss: the support set's, through the linear layer."""
        self.check_ways(ways)
        return loss_and_accuracy(self.outputs(params, encode, xs, None), ys, self.regression)[0]

    def outputs(self, params, encode, x, n_stats):
        h = encode(params, x, n_stats)
        return at_least_float32(F.linear(h, params[PREFIX + "weight"], params[PREFIX + "bias"]))

    def check_ways(self, ways):
        if not self.regression and ways != self.weight.shape[0]:
            raise UserError(f"data.ways: a MAML model has one output per class; this one was "
                            f"built for {self.weight.shape[0]} ways, not {ways}")


class FirstOrderMAMLHead(MAMLHead):
    """FO-MAML: each inner gradient is a constant in the meta-gradient."""

    first_order = True
