"""Fault injection for tests and drills: a task source that poisons, kills or hangs on cue.

`FaultySource` wraps the config's task source. At chosen training steps it makes a drawn task
non-finite (NaN inputs, so the task's meta-gradient is NaN), SIGKILLs the process that draws
(a shard worker dying mid-step), or blocks (a hung worker). It can also refuse validation and
test episodes in one process (the driver's, to show they are evaluated on the workers). Kills and hangs can be made
one-shot with a marker directory, shared by all processes of a machine, so that the worker
that replaces a killed one computes the shard normally.

Build it in a worker with `faulty_source_factory(**options)` (a picklable callable
cfg -> source) passed to RayBackend(source_factory=...) or used with InProcessBackend.
"""
from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


class FaultySource:
    def __init__(self, source, nan_tasks: Iterable[tuple[int, int]] = (),
                 nan_steps: Iterable[int] = (), kill_steps: Iterable[int] = (),
                 hang_steps: Iterable[int] = (), once_dir: str | None = None,
                 no_episodes_in_pid: int | None = None):
        self.source = source
        self.nan_tasks = {(int(s), int(t)) for s, t in nan_tasks}
        self.nan_steps = {int(s) for s in nan_steps}
        self.kill_steps = {int(s) for s in kill_steps}
        self.hang_steps = {int(s) for s in hang_steps}
        self.once_dir = Path(once_dir) if once_dir else None
        # validation and test episodes drawn in this process fail: they belong on the workers
        self.no_episodes_in_pid = no_episodes_in_pid

    def __getattr__(self, name):  # input_shape, ways, ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def _fire(self, kind: str, step: int) -> bool:
        """True if this fault should happen now (always, or once per machine with once_dir)."""
        if self.once_dir is None:
            return True
        try:
            fd = os.open(self.once_dir / f"{kind}-step{step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def sample(self, split: str, step: int, task_ids: Sequence[int], *args, **kwargs):
        if split != "train" and os.getpid() == self.no_episodes_in_pid:
            raise RuntimeError(f"{split} episodes drawn in process {os.getpid()}, which was "
                               f"told to leave them to its workers")
        if split == "train" and task_ids:
            if step in self.kill_steps and self._fire("kill", step):
                os.kill(os.getpid(), signal.SIGKILL)
            if step in self.hang_steps and self._fire("hang", step):
                time.sleep(10 ** 6)
        ep = self.source.sample(split, step, task_ids, *args, **kwargs)
        if split != "train":
            return ep
        bad = [i for i, t in enumerate(task_ids)
               if step in self.nan_steps or (step, int(t)) in self.nan_tasks]
        if bad:
            xs = ep.xs
            # uint8 images become the floats the device would see (Episodes.to), then NaN
            xs = xs.float().div(255.0) if xs.dtype == torch.uint8 else xs.clone()
            xs[bad] = float("nan")
            ep.xs = xs
        return ep


def _build(cfg, **options):
    from amfs_dist.data import make_task_source
    return FaultySource(make_task_source(cfg), **options)


def faulty_source_factory(**options):
    """A picklable cfg -> FaultySource(make_task_source(cfg), **options)."""
    return functools.partial(_build, **options)
