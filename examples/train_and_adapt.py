"""Train in Python, then adapt the trained model to classes it never saw, from one example each.

    python examples/train_and_adapt.py [--out runs/example] [--tiny]

Trains AMFS on the embedded synthetic glyphs (the training split's classes), then takes five
classes of the test split, gives the model one image of each (5-way 1-shot) and classifies
five more images of each. --tiny: a few steps, for a quick check that it runs.
"""
import argparse
import tempfile

import torch

import amfs_dist
from amfs_dist.data.synthetic import glyph_images

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", help="run directory (default: a temporary one)")
parser.add_argument("--tiny", action="store_true", help="a few training steps, tiny model")
args = parser.parse_args()

settings = ({"train_steps": 2, "model_width": 8, "train_meta_batch": 2, "eval_episodes": 2,
             "train_val_every": 0} if args.tiny else {"train_steps": 300, "eval_episodes": 100})
out = args.out or tempfile.mkdtemp(prefix="amfs-example-")
run = amfs_dist.train_run(out=out, method="amfs", data_ways=5, data_shots=1, **settings)
print(f"trained {run.path}: test accuracy {run.result['test_accuracy']:.3f} "
      f"({run.result['test_episodes']} episodes of 5-way 1-shot)")

# five classes the model never trained on, one support image and five queries each
glyphs = glyph_images(seed=0, size=28)
classes = glyphs.splits["test"][:5]
support, support_labels, queries, query_labels = [], [], [], []
for c in classes:
    name, members = glyphs.class_names[c], glyphs.members(int(c))
    support.append(torch.from_numpy(glyphs.images[members[0]]))
    support_labels.append(name)
    for i in members[1:6]:
        queries.append(torch.from_numpy(glyphs.images[i]))
        query_labels.append(name)

adapted = amfs_dist.load(run).adapt(support, support_labels)
predicted, probabilities = adapted.predict(queries)
hits = sum(p == t for p, t in zip(predicted, query_labels))
print(f"adapted to {adapted.classes} from one image each: {hits}/{len(queries)} queries right")
print(f"first query: true {query_labels[0]}, predicted {predicted[0]} "
      f"(p={probabilities[0].max():.2f})")
