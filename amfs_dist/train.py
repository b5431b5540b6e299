"""Meta-training: the driver loop, checkpoints, resume, validation and the final test.

The driver owns the parameters and the optimiser; a backend (in-process or Ray shards)
returns each step's update direction, or (dist.exchange=collective) applies the update on its
workers' replicas, and the driver fetches the state only to checkpoint, validate and finish.
Episodes depend on (seed, step, task id) only and the checkpoint holds everything else, so a
resumed run ends where an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.algorithms.outer import task_weights
from amfs_dist.backend import (GradientBackend, InProcessBackend, StepResult, apply_direction,
                               set_deterministic)
from amfs_dist.config import Config, load_config, save_config
from amfs_dist.data import make_task_source
from amfs_dist.data.conflict import corrupted_tasks
from amfs_dist.errors import RunStopped, TrainingError, UserError  # TrainingError: re-exported
from amfs_dist.evaluate import evaluate_episodes, resolve_device
from amfs_dist.runs import (check_new_run_dir, load_module_state, load_torch_file, make_run_dir,
                             read_metrics)
from amfs_dist.stopping import (STOP_SIGNALS, StopRequested, as_stop, raise_on_stop,
                                 signal_name)
from amfs_dist.storage import is_uri, staged_run

CHECKPOINT = "checkpoint.pt"
POSTFIX = {"loss": "loss", "acc": "acc", "val": "val_accuracy"}  # progress bar: label -> metric


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.method_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_backend(cfg: Config, learner: MetaLearner, source) -> GradientBackend:
    if cfg.dist.workers == 0:
        return InProcessBackend(cfg, learner, source)
    from amfs_dist.distributed import CollectiveBackend, RayBackend  # Ray only when asked for
    return (CollectiveBackend if cfg.dist.exchange == "collective" else RayBackend)(cfg)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, backend: GradientBackend | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        set_deterministic(cfg)
        torch.manual_seed(cfg.seed)
        self.source = make_task_source(cfg)
        self.learner = MetaLearner(cfg, self.source.input_shape, resolve_device(cfg))
        self.optimizer = torch.optim.Adam(self.learner.params().values(), lr=cfg.train.lr)
        self.step = 0
        self.bad_streak = 0
        self._backend = backend
        self.stop_signal: int | None = None
        self._updating = self._stop_now = False  # a second stop signal waits for the update
        self._validating = False  # a stop signal ends a validation at once
        self.remote = None  # a storage.RemoteRun when --out is a URI: run_dir is its local copy
        self._synced_step = None  # an update-owning backend's replicas are at this step
        self._pulled_step = None  # ... and this trainer's copy was fetched at this step

    @property
    def location(self) -> str | Path:
        """Where the run lives: its URI for a run on object storage, else its directory."""
        return self.remote.uri if self.remote else self.run_dir

    @property
    def owns_update(self) -> bool:
        return getattr(self.backend, "owns_update", False)

    @property
    def backend(self) -> GradientBackend:
        if self._backend is None:
            self._backend = make_backend(self.cfg, self.learner, self.source)
        return self._backend

    # -- state -----------------------------------------------------------------------------------
    def pull_state(self) -> None:
        """Bring the parameters and Adam state back from an update-owning backend's replicas."""
        if (self._backend is None or not self.owns_update or self._synced_step is None
                or self._pulled_step == self.step):
            return
        state = self.backend.state()
        self.learner.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pulled_step = self.step

    def _push_state(self) -> None:
        if self._synced_step != self.step:
            self.backend.load_state({"model": self.learner.module.state_dict(),
                                     "optimizer": self.optimizer.state_dict(), "step": self.step})
        self._synced_step = self.step

    def save_checkpoint(self) -> None:
        self.pull_state()
        _atomic_save({"step": self.step, "bad_streak": self.bad_streak,
                      "model": self.learner.module.state_dict(),
                      "optimizer": self.optimizer.state_dict(),
                      "torch_rng": torch.get_rng_state(),
                      "input_shape": list(self.source.input_shape)}, self.run_dir / CHECKPOINT)
        if self.remote is not None:
            self.remote.push()

    def load_checkpoint(self) -> None:
        """Restore the checkpoint; a damaged, foreign or mismatching one is a UserError."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise UserError(f"{self.run_dir}: no {CHECKPOINT} to resume from")
        state = load_torch_file(path, ("step", "bad_streak", "model", "optimizer", "torch_rng"),
                                "checkpoint", self.learner.device)
        shape = list(self.source.input_shape)
        if state.get("input_shape", shape) != shape:  # older checkpoints do not record it
            raise UserError(f"{path}: the run was trained on inputs of shape {state['input_shape']}"
                            f", its config now gives {shape} (data.source, data.image_size, "
                            f"data.channels)")
        load_module_state(self.learner.module, state["model"], path, self.run_dir / "config.yaml")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"].cpu())
            self.step, self.bad_streak = int(state["step"]), int(state["bad_streak"])
        except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
            raise UserError(f"{path}: not an amfs checkpoint for this run ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
        self._synced_step = self._pulled_step = None

    # -- one step --------------------------------------------------------------------------------
    def weigh(self, vectors: torch.Tensor | None, gram: torch.Tensor | None = None):
        o = self.cfg.outer
        return task_weights(vectors, self.cfg.outer_weighting, o.normalize, o.temperature, gram)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        task_ids = list(range(self.cfg.train.meta_batch))
        if self.owns_update:
            self._push_state()
            res = self.backend.step(self.step, task_ids, self.weigh)
            self._synced_step = self.step + 1
        else:
            res = self.backend.direction(self.learner.flat_params(), self.step, task_ids,
                                         self.weigh)
        t1 = time.perf_counter()
        self._updating = True
        if res.direction is not None:
            apply_direction(self.learner, self.optimizer, res.direction)
        if not res.skipped:
            self.bad_streak = 0
        else:
            self.bad_streak += 1
        res.timings["update_s"] = time.perf_counter() - t1
        res.timings["step_s"] = time.perf_counter() - t0
        self.step += 1
        self._updating = False
        if self._stop_now:
            raise StopRequested(self.stop_signal)
        return res

    def metrics_row(self, res: StepResult) -> dict:
        finite = res.finite.cpu()
        row = {"step": self.step, "skipped": res.skipped, "bad_tasks": res.bad_tasks,
               "loss": _nanmean(res.loss[finite]), "acc": _nanmean(res.acc[finite])}
        if res.weights is not None:
            summary = res.weights.summary()
            full = torch.zeros(len(finite), dtype=torch.float64)
            full[finite] = torch.tensor(summary["weights"], dtype=torch.float64)
            summary["weights"] = [round(float(w), 6) for w in full]
            row.update(summary)
        if self.cfg.data.conflict_fraction > 0:
            row.update(_conflict_metrics(self.cfg, self.step - 1, finite, row.get("weights")))
        row.update({k: round(v, 6) for k, v in res.timings.items()})
        return row

    # -- the loop --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_at_step_boundary(self):
        """While training, a stop signal ends the current step, then checkpoints and stops;
        a validation it ends at once (the step's row is logged without it).

        A second signal stops at once (StopRequested): the checkpoint then holds the last
        finished step. Handlers can only be set from the main thread (a Tune trial runs fit in
        another one, and Tune stops it its own way), so elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self.stop_signal is None:
                self.stop_signal = signum
                if self._validating:  # hundreds of episodes, none of them worth the wait
                    raise_on_stop(signum, frame)
                elif getattr(self._backend, "waiting_for_workers", False):  # no step ends soon
                    raise RunStopped(f"stopped by {signal.Signals(signum).name} at step "
                                     f"{self.step} while waiting for shard workers; checkpoint "
                                     f"saved: resume with `amfs train --resume {self.location}`",
                                     signum)
            elif self._updating:  # parameters half updated: stop right after the update
                self._stop_now = True
            else:
                raise_on_stop(signum, frame)

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def validate(self) -> dict:
        t = self.cfg.train
        self.pull_state()
        return evaluate_episodes(self.learner, self.source, "val", t.val_episodes,
                                 self.cfg.eval.queries, self.cfg.eval.batch)

    def _stoppable_validation(self) -> dict | None:
        """validate(); None when a stop signal ended it."""
        try:
            self._validating = True
            return self.validate()
        except StopRequested:
            return None
        finally:
            self._validating = False

    def fit(self, progress: bool = True, on_step: Callable[["Trainer", dict], None] | None = None,
            on_validation: Callable[["Trainer", dict], None] | None = None) -> None:
        t = self.cfg.train
        metrics = self.run_dir / "metrics.jsonl"
        _truncate_metrics(metrics, self.step)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"{self.cfg.method_name} meta-train",
                   disable=not progress, dynamic_ncols=True)
        _ = self.backend  # started before the handlers are set: ray.init sets its own
        try:
            with metrics.open("a") as log, self.stop_at_step_boundary():
                while self.step < t.steps:
                    res = self.train_step()
                    row = self.metrics_row(res)
                    if t.val_every and self.step % t.val_every == 0 and self.stop_signal is None:
                        val = self._stoppable_validation()
                        if val is not None:
                            row["val_accuracy"], row["val_loss"] = val["accuracy"], val["loss"]
                            if on_validation:
                                on_validation(self, row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    if self.bad_streak >= t.max_bad_steps:
                        raise TrainingError(
                            f"{t.max_bad_steps} consecutive steps without a finite task gradient "
                            f"(train.max_bad_steps) at step {self.step}; checkpoint kept in "
                            f"{self.run_dir / CHECKPOINT}")
                    if self.step % t.checkpoint_every == 0:
                        self.save_checkpoint()
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        bar.set_postfix({k: f"{row[v]:.3f}" for k, v in POSTFIX.items()
                                         if row.get(v) is not None})
                    if on_step:
                        on_step(self, row)
                    if self.stop_signal is not None:  # the last step's too: the test can wait
                        name = signal_name(self.stop_signal)
                        raise RunStopped(f"stopped by {name} after step {self.step}; checkpoint "
                                         f"saved: resume with `amfs train --resume "
                                         f"{self.location}`",
                                         self.stop_signal)
        except BaseException as e:
            try:
                self.save_checkpoint()  # nothing done so far is lost: resume from here
            except Exception as lost:  # no replica of an update-owning backend is left
                print(f"could not checkpoint step {self.step} ({lost}); the last checkpoint "
                      f"is kept", file=sys.stderr)
            if isinstance(e, KeyboardInterrupt):
                print(f"\nstopped at step {self.step}; checkpoint saved: resume with "
                      f"`amfs train --resume {self.location}`", file=sys.stderr)
            raise
        finally:
            bar.close()
        self.save_checkpoint()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


def _conflict_metrics(cfg: Config, step: int, finite: torch.Tensor, weights: list | None) -> dict:
    """The step's conflicting tasks (recomputed from the config: the same ones every worker drew)
    and the mean weight of the finite corrupted and clean tasks."""
    corrupted = corrupted_tasks(cfg.seed, step, cfg.train.meta_batch, cfg.data.conflict_fraction)
    row = {"corrupted": corrupted, "weight_corrupted": None, "weight_clean": None}
    if weights is not None:
        for key, bad in (("weight_corrupted", True), ("weight_clean", False)):
            w = [w for i, w in enumerate(weights) if bool(finite[i]) and (i in corrupted) == bad]
            row[key] = sum(w) / len(w) if w else None
    return row


def _nanmean(x: torch.Tensor) -> float | None:
    x = x.double().cpu()
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows past the checkpoint's step, so a resumed run's log has each step once."""
    if not path.exists():
        return
    rows = [row for row in read_metrics(path) if row["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_training(cfg: Config | None = None, out: str | Path | None = None,
                 resume: str | Path | None = None, progress: bool = True,
                 overrides: list[str] | None = None, backend: GradientBackend | None = None,
                 on_step=None, on_validation=None, resume_if_exists: bool = False,
                 remote=None) -> dict:
    """`amfs train`: train, evaluate on the test split, write result.json; returns the result.

    resume_if_exists (start or continue): a run already in `out` with the same config is
    resumed from its checkpoint, or its result returned when it has finished.
    An s3:// or gs:// --out/--resume is trained in a local copy, pushed back at every checkpoint."""
    target = resume if resume is not None else out
    if target is not None and is_uri(target):
        with staged_run(str(target)) as remote:
            local = {"resume": remote.local} if resume is not None else {"out": remote.local}
            return run_training(cfg, **local, progress=progress, overrides=overrides,
                                backend=backend, on_step=on_step, on_validation=on_validation,
                                resume_if_exists=resume_if_exists, remote=remote)
    started = time.perf_counter()
    if resume is None and resume_if_exists and out and (Path(out) / "config.yaml").is_file():
        _check_same_config(Path(out), cfg)
        if (Path(out) / "result.json").is_file():  # finished: nothing to redo
            return json.loads((Path(out) / "result.json").read_text())
        if (Path(out) / CHECKPOINT).is_file():
            resume, cfg = out, None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
        _refuse_model_changes(run_dir, load_config(run_dir / "config.yaml"), cfg)
    else:
        run_dir = Path(out) if out else default_run_dir(cfg)
        check_new_run_dir(run_dir, CHECKPOINT)
    trainer = Trainer(cfg, run_dir, backend)  # bad data or model settings fail before any write
    trainer.remote = remote
    try:
        if resume is not None:
            trainer.load_checkpoint()  # a damaged or mismatching checkpoint, too
        _ = trainer.backend  # workers the cluster cannot hold are refused before any write
        if resume is None:
            make_run_dir(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        trainer.fit(progress=progress, on_step=on_step, on_validation=on_validation)
    finally:
        trainer.close()
    try:
        return finish_run(trainer, started, progress, resumed=resume is not None)
    except KeyboardInterrupt as e:
        stop = as_stop(e)
        if stop is None:
            raise
        raise RunStopped(f"stopped by {stop} during the final test; every step is checkpointed"
                         f": run the test with `amfs train --resume {trainer.location}`",
                         stop.signum) from None


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    """Start-or-continue may only continue the run it was asked for: the same config."""
    stored, given = load_config(run_dir / "config.yaml").to_flat(), cfg.to_flat()
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


def finish_run(trainer: Trainer, started: float, progress: bool = False, **extra) -> dict:
    """Save model.pt, evaluate on the test split, write result.json; returns the result."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    _atomic_save({"model": trainer.learner.module.state_dict(),
                  "input_shape": list(trainer.source.input_shape)}, run_dir / "model.pt")
    test = evaluate_episodes(trainer.learner, trainer.source, "test", cfg.eval.episodes,
                             cfg.eval.queries, cfg.eval.batch, progress=progress)
    result = {"method": cfg.method_name, "inner": cfg.inner_loop, "outer": cfg.outer_weighting,
              "data_source": cfg.data.source, "ways": cfg.data.ways, "shots": cfg.data.shots,
              "test_accuracy": test["accuracy"], "test_ci95": test["ci95"],
              "test_episodes": test["episodes"], "test_loss": test["loss"],
              "adapt_ms_per_task": test["adapt_ms_per_task"], "meta_steps": trainer.step,
              "wall_s": round(time.perf_counter() - started, 3), **extra}
    if "mse" in test:
        result["test_mse"] = test["mse"]
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if trainer.remote is not None:
        trainer.remote.push()
    return result
