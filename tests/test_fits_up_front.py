"""Requests that cannot fit or never end are refused before anything runs: one line naming
the key, exit 2, nothing written (the model and glyphs are sized without allocating them)."""
from __future__ import annotations

import pytest

from amfs_dist.cli import main
from conftest import TINY
from helpers import snapshot

NEVER = 10**12  # episodes


def train(tmp, *args):
    return ["train", "--out", str(tmp / "new"), "--no-progress", *TINY, "train.steps=1", *args]


# (id, argv(tmp), the key the line names)
ROWS = [
    ("model-width-petabytes", lambda t: train(t, "model.width=10000000"), "model.width="),
    ("mlp-width-petabytes", lambda t: train(t, "data.source=sinusoid", "model.backbone=mlp",
                                                "model.width=100000000"), "model.width="),
    ("glyphs-at-image-size-100000", lambda t: train(t, "data.image_size=100000"),
     "data.image_size=100000"),
    ("glyphs-at-image-size-1000", lambda t: train(t, "data.image_size=1000"),
     "data.image_size=1000"),
    ("shapes-at-image-size-1000", lambda t: train(t, "data.source=shapes",
                                                  "data.image_size=1000"),
     "data.image_size=1000"),
    ("eval-episodes-never-end", lambda t: train(t, f"eval.episodes={NEVER}"), "eval.episodes="),
    ("val-episodes-never-end", lambda t: train(t, "train.val_every=1",
                                               f"train.val_episodes={NEVER}"),
     "train.val_episodes="),
]


@pytest.mark.parametrize("argv,named", [pytest.param(a, n, id=i) for i, a, n in ROWS])
def test_a_request_that_cannot_fit_or_end_is_refused_up_front(argv, named, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amfs: error: "), err
    assert named in lines[0], err
    assert snapshot(tmp_path) == before


def test_sizes_that_fit_are_sized_without_allocating():
    from amfs_dist.config import load_config
    from amfs_dist.data import model_footprint
    cfg = load_config(None, ["model.width=8"])
    params, per_input = model_footprint(cfg, (1, 28, 28))
    # Conv-4 of width 8 on 1x28x28: 4 conv+BN blocks; the first block's output alone is 8x28x28
    assert 1000 < params < 5000 and per_input > 8 * 28 * 28
