"""The life of a run directory: start a run, resume one, start-or-continue, and runs whose
directory is an s3:// or gs:// URI (trained in a local copy, pushed back at every checkpoint).

Each entry point owns the run directory for its whole life (locks.py): a second process is
refused, naming the first, or waits for it (wait_for_lock). The training loop is train.Trainer.

    train(cfg, out)                              a new run (refuses one that holds a run)
    train(cfg, out, start_or_continue=True)      the run in `out` if it has the same config,
                                                 else a new one (for requeued jobs)
    resume(run_dir, overrides)                   continue a run from its checkpoint

The keyword-only `progress`, `backend`, `on_step` and `on_validation` are handed to the trainer.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from amfs_dist import locks
from amfs_dist.config import Config, save_config
from amfs_dist.errors import RunStopped, UserError
from amfs_dist.runs import (
    CHECKPOINT,
    CONFIG,
    MARKER,
    RESULT,
    check_new_run_dir,
    check_run_version,
    is_run_dir,
    make_run_dir,
    read_result,
    read_run_config,
)
from amfs_dist.stopping import as_stop
from amfs_dist.storage import RemoteRun, is_uri, training_copy
from amfs_dist.train import Trainer, finish_run


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.method_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, out: str | Path | None = None, *, start_or_continue: bool = False,
          wait_for_lock: bool = False, **loop) -> dict:
    """Train `cfg` into `out` (default runs/METHOD-TIMESTAMP), test it, write result.json;
    returns the result. With start_or_continue, a run of the same config already in `out` is
    resumed from its checkpoint, or its result returned when it has finished."""
    out = out or default_run_dir(cfg)
    if not is_uri(out) and not (start_or_continue and (Path(out) / CONFIG).is_file()):
        check_new_run_dir(Path(out))  # refused before anything is built
    # bad data or model settings are refused before anything is written, the lock included
    trainer = Trainer(cfg, Path(str(out)), loop.pop("backend", None),
                      source_factory=loop.pop("source_factory", None))
    try:
        with _owned(out, wait_for_lock) as (run_dir, remote):
            trainer.run_dir, trainer.remote = run_dir, remote
            if start_or_continue and (run_dir / CONFIG).is_file():
                check_run_version(run_dir)  # a torn marker: named
                if not is_run_dir(run_dir):  # someone's own folder: never taken for ours
                    raise UserError(f"--out {_name(run_dir, remote)}: holds a config.yaml but "
                                    f"is not an amfs run (no {MARKER}); choose another --out")
                _check_same_config(run_dir, cfg)
                if (run_dir / RESULT).is_file():  # finished: nothing to redo
                    return read_result(run_dir)
                if (run_dir / CHECKPOINT).is_file():
                    return _resume(run_dir, None, loop, trainer)
            return _start(trainer, loop)
    finally:
        trainer.close()


def resume(run_dir: str | Path, overrides: list[str] | None = None, *,
           wait_for_lock: bool = False, **loop) -> dict:
    """Continue the run in `run_dir` from its checkpoint with its config.yaml and `overrides`
    (which may not change the model's shape); returns the result, as train."""
    if not is_uri(run_dir):
        read_run_config(Path(run_dir))  # not a run: refused before anything is written
    with _owned(run_dir, wait_for_lock) as (local, remote):
        return _resume(local, overrides, loop, remote=remote)


@contextlib.contextmanager
def _owned(target: str | Path, wait_for_lock: bool) -> Iterator[tuple[Path, RemoteRun | None]]:
    """(local run directory, its RemoteRun for a URI), locked by this process."""
    if is_uri(target):
        with training_copy(str(target), wait_for_lock) as remote:
            yield remote.local, remote
    else:
        with locks.hold(target, "run directory", wait_for_lock):
            yield Path(target), None


def _name(run_dir: Path, remote: RemoteRun | None) -> str:
    return remote.uri if remote else str(run_dir)


def _start(trainer: Trainer, loop: dict) -> dict:
    started = time.perf_counter()
    check_new_run_dir(trainer.run_dir)  # again, now that the directory is ours
    progress = loop.pop("progress", True)
    trainer.prepare()  # workers the cluster cannot hold are refused before any write
    make_run_dir(trainer.run_dir)
    save_config(trainer.cfg, trainer.run_dir / CONFIG)
    trainer.fit(progress=progress, test=True, **loop)
    return _finish(trainer, started, progress)  # the final test runs on the workers too


def _resume(run_dir: Path, overrides: list[str] | None, loop: dict,
            trainer: Trainer | None = None, remote: RemoteRun | None = None) -> dict:
    """Continue the run in `run_dir`, with `trainer` when start-or-continue built it already
    (of the same config), else with one built from config.yaml and `overrides`."""
    started = time.perf_counter()
    check_run_version(run_dir)
    cfg = read_run_config(run_dir, overrides)
    _refuse_model_changes(run_dir, read_run_config(run_dir), cfg)
    if trainer is None:
        trainer = Trainer(cfg, run_dir, loop.pop("backend", None),
                          source_factory=loop.pop("source_factory", None))
        trainer.remote = remote
    progress = loop.pop("progress", True)
    try:
        trainer.load_checkpoint()  # a damaged or mismatching checkpoint, too
        trainer.prepare()
        trainer.config_to_write = cfg  # written with the first checkpoint past the loaded one
        trainer.fit(progress=progress, test=True, **loop)
        return _finish(trainer, started, progress, resumed=True)
    finally:
        trainer.close()


def _finish(trainer: Trainer, started: float, progress: bool, **extra) -> dict:
    """finish_run; a stop signal during its final test says how to run the test again."""
    try:
        return finish_run(trainer, started, progress, **extra)
    except KeyboardInterrupt as e:
        stop = as_stop(e)
        if stop is None:
            raise
        raise RunStopped(f"stopped by {stop} during the final test; every step is checkpointed"
                         f": run the test with `amfs train --resume {trainer.location}`",
                         stop.signum) from None


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    """Start-or-continue may only continue the run it was asked for: the same config."""
    stored, given = read_run_config(run_dir, flag="--out").to_flat(), cfg.to_flat()
    diff = [f"{k} (stored {stored[k]!r}, given {given[k]!r})" for k in stored
            if stored[k] != given[k]]
    if diff:
        raise UserError(f"--out {run_dir}: holds a run with another config: {', '.join(diff)}; "
                        f"continue it as it is with `amfs train --resume {run_dir}`, or choose "
                        f"another --out")


def _model_settings(cfg: Config) -> dict:
    """The settings that decide the model's parameters: fixed for the life of a run."""
    kernel = cfg.inner_loop == "kernel"
    return {"model.backbone": cfg.backbone, "model.width": cfg.model.width,
            "data.ways": cfg.data.ways, "data.image_size": cfg.data.image_size,
            "data.channels": cfg.data.channels, "inner (or method)": cfg.inner_loop,
            "kernel.type": cfg.kernel.type if kernel else None,
            "kernel.learn_bandwidth": cfg.kernel.learn_bandwidth if kernel else None,
            "kernel.learn_lam": cfg.kernel.learn_lam if kernel else None}


def _refuse_model_changes(run_dir: Path, run_cfg: Config, cfg: Config) -> None:
    was, now = _model_settings(run_cfg), _model_settings(cfg)
    changed = [f"{k} ({was[k]} -> {now[k]})" for k in was if was[k] != now[k]]
    if changed:
        raise UserError(f"--resume {run_dir}: {', '.join(changed)} would change the model's "
                        f"shape, which a resumed run cannot; start a new run with --out instead")
