"""Shared fixtures: tiny configs, and one Ray cluster per test session (started on first use)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Settings small enough for a test on 2 CPU cores, large enough to exercise every code path.
TINY = ["data.ways=3", "data.shots=1", "data.queries=2", "model.width=8", "train.meta_batch=4",
        "train.val_every=0", "eval.episodes=6", "eval.queries=2", "eval.batch=3",
        "train.val_episodes=3", "maml.steps=1", "maml.test_steps=1"]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@contextlib.contextmanager
def ctrl_c_at_step(step: int):
    """Within the block, Trainer.train_step raises KeyboardInterrupt (what Ctrl-C raises) when
    the trainer's step counter is `step`."""
    from amfs_dist.train import Trainer
    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    Trainer.train_step = interrupted
    try:
        yield
    finally:
        Trainer.train_step = real_step


class PickleThatWritesAFile:
    """Unpickling this (torch.load with weights_only=False, pickle.load) creates the file `path`:
    a stand-in for the code a crafted pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole session: 2 CPUs and 2 logical GPUs (placement only)."""
    ray = pytest.importorskip("ray")
    from amfs_dist.distributed.cluster import start_private_ray
    if not ray.is_initialized():
        # always a new private cluster on 127.0.0.1, never one that another `ray start` left
        start_private_ray(num_cpus=2, num_gpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
