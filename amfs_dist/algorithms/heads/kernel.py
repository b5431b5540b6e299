"""I-AMFS's closed-form kernel head (`inner=kernel`: amfs, iamfs; with the linear kernel, r2d2).

docs/algorithm.md, "Inner loop: I-AMFS, a closed-form solve"; the math is in
amfs_dist/algorithms/kernel.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amfs_dist.algorithms import kernel
from amfs_dist.algorithms.heads.base import FeatureHead


class KernelHead(FeatureHead):
    """Meta-parameters: log bandwidth (RBF only), log lambda, output scale (and bias, for
    regression)."""

    def __init__(self, cfg, features, regression, ways):
        super().__init__(cfg, features, regression, ways)
        k = cfg.kernel
        log_lam = torch.tensor(math.log(k.lam))
        if k.type == "rbf":
            log_bw = torch.tensor(math.log(k.bandwidth))
            if k.learn_bandwidth:
                self.log_bandwidth = nn.Parameter(log_bw)
            else:
                self.register_buffer("log_bandwidth", log_bw)
        if k.learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        # logits from a kernel fit to one-hot targets lie in ~[0, 1]; softmax needs a wider range
        self.scale = nn.Parameter(torch.tensor(1.0 if regression else 10.0))
        # a bias shared by all classes does nothing under softmax (its gradient is exactly 0,
        # and Adam would turn float noise in it into full-size steps): regression only
        if regression:
            self.bias = nn.Parameter(torch.tensor(0.0))

    def predict(self, params, zs, ys, zq, ways, training):
        k = self.cfg.kernel
        if k.normalize:
            zs, zq = F.normalize(zs, dim=-1), F.normalize(zq, dim=-1)
        if k.type == "linear":
            gram = kernel.linear_kernel
        else:
            gram = lambda a, b: kernel.rbf_kernel(a, b, params["log_bandwidth"])
        lam = torch.exp(params["log_lam"])
        K = gram(zs, zs)
        alpha = kernel.solve_coefficients(K, self.targets(ys, ways, zs.dtype), lam, k.mu)
        if k.first_order and training:
            alpha = alpha.detach()
        out = params["scale"] * (gram(zq, zs) @ alpha)
        if self.regression:
            out = out + params["bias"]
        penalty = k.gamma * kernel.information_term(K, lam) / zs.shape[0] if k.gamma > 0 else 0.0
        return out, penalty
