"""A head of your own: cosine prototypes, registered at run time, trained and adapted like any other.

    python examples/custom_head.py [--out runs/cosine] [--tiny]

A head turns a task's support features into predictions for its queries (see
amfs_dist/algorithms/heads/base.py). This one scores a query by the cosine between its features
and each class's mean support feature, times a learned scale. Registering it adds the method
`cosproto`; the run then trains in this process (Ray workers do not run this script, so they
would not know the head). --tiny: a few steps, for a quick check that it runs.
"""
import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import amfs_dist
from amfs_dist.algorithms.heads import register
from amfs_dist.algorithms.heads.base import FeatureHead


class CosinePrototypeHead(FeatureHead):
    def __init__(self, cfg, features, regression, ways):
        super().__init__(cfg, features, regression, ways)
        # cosines lie in [-1, 1]: softmax needs a wider range, learned from 10
        self.scale = nn.Parameter(torch.tensor(10.0))

    def predict(self, params, zs, ys, zq, ways, training):
        onehot = self.targets(ys, ways, zs.dtype)              # [n, ways], vmap-safe
        prototypes = onehot.T @ zs / onehot.sum(0)[:, None]    # class means, [ways, d]
        cosines = F.normalize(zq, dim=-1) @ F.normalize(prototypes, dim=-1).T
        return params["scale"] * cosines, 0.0                  # (logits, no loss penalty)


register("cosine_prototypes", CosinePrototypeHead,
         {"cosproto": {"outer.weighting": "mean"}}, classification_only=True)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", help="run directory (default: a temporary one)")
parser.add_argument("--tiny", action="store_true", help="a few training steps, tiny model")
args = parser.parse_args()

settings = ({"train_steps": 2, "model_width": 8, "train_meta_batch": 2, "eval_episodes": 2,
             "train_val_every": 0} if args.tiny else {"train_steps": 200, "eval_episodes": 100})
out = args.out or tempfile.mkdtemp(prefix="amfs-example-")
run = amfs_dist.train_run(out=out, method="cosproto", **settings)
print(f"method {run.result['method']} (inner {run.result['inner']}): test accuracy "
      f"{run.result['test_accuracy']:.3f} over {run.result['test_episodes']} episodes")
