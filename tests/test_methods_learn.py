"""Every method learns: meta-training on the embedded glyphs raises its test accuracy.

Settings: 5-way 1-shot (chance 0.2), a width-8 Conv-4, 30 meta-steps of 4 tasks. An untrained
model is already above chance (random features separate glyphs somewhat: 0.44-0.55 here), so
each method must beat both chance and its own untrained accuracy, on the same 40 test episodes
of 15 queries, by MARGIN = 0.08. Per-episode accuracies vary by about 0.2, so the 95% interval
of a mean over 40 episodes is +-1.96 * 0.2 / sqrt(40) = +-0.06; a difference of two means would
be +-0.088 if they were independent, less on the same episodes (an easy episode is easy before
and after). A gain of 0.08 is beyond what the episodes' noise gives. Measured gains with
these settings: 0.105 (fomaml), 0.12 (oamfs), 0.145 (r2d2), 0.18 (maml), 0.22 (amfs, iamfs),
0.23 (metaoptnet), 0.29 (protonet). The runs are seeded, so the test is deterministic.
"""
import pytest

from amfs_dist.config import load_config
from amfs_dist.evaluate import evaluate_episodes
from amfs_dist.train import Trainer

MARGIN = 0.08
SETTINGS = ["data.ways=5", "data.shots=1", "data.queries=3", "model.width=8",
            "train.meta_batch=4", "train.steps=30", "train.lr=0.005", "train.val_every=0",
            "maml.steps=1", "maml.test_steps=3", "maml.lr=0.1"]
EPISODES, QUERIES = 40, 3


def _test_accuracy(trainer) -> float:
    return evaluate_episodes(trainer.learner, trainer.source, "test", EPISODES, QUERIES,
                             batch=20)["accuracy"]


@pytest.mark.parametrize("method", [
    "amfs", "iamfs", "protonet", "r2d2", "metaoptnet",
    pytest.param("maml", marks=pytest.mark.slow), pytest.param("oamfs", marks=pytest.mark.slow),
    pytest.param("fomaml", marks=pytest.mark.slow)])
def test_method_learns_on_synthetic_glyphs(method, tmp_path):
    trainer = Trainer(load_config(None, SETTINGS + [f"method={method}"]), tmp_path)
    trainer.run_dir.mkdir(exist_ok=True)
    try:
        before = _test_accuracy(trainer)
        trainer.fit(progress=False)
        after = _test_accuracy(trainer)
    finally:
        trainer.close()
    assert after > max(before, 1 / 5) + MARGIN, (before, after)
