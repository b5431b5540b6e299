"""ProtoNet's head (`inner=protonet`, Snell et al. 2017): docs/algorithm.md, "Inner loop:
prototypical networks"; the math is in amfs_dist/algorithms/protonet.py."""
from __future__ import annotations

import torch
from torch import nn

from amfs_dist.algorithms import protonet
from amfs_dist.algorithms.heads.base import FeatureHead


class ProtoNetHead(FeatureHead):
    """One meta-parameter: a scale on the logits -||z - c_k||^2 (a learned softmax temperature;
    it starts at 1, Snell et al.'s plain distances)."""

    def __init__(self, cfg, features, regression, ways):
        super().__init__(cfg, features, regression, ways)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def predict(self, params, zs, ys, zq, ways, training):
        protos = protonet.prototypes(zs, self.targets(ys, ways, zs.dtype))
        return params["scale"] * protonet.logits(zq, protos), 0.0
