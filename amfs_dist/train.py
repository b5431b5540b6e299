"""Meta-training: the driver loop, checkpoints, validation and the final test (the run
directory's life, start and resume, is lifecycle.py's).

The driver owns the parameters and the optimiser; a backend (in-process or Ray shards)
returns each step's update direction, or (dist.exchange=collective) applies the update on its
workers' replicas, and the driver fetches the state only to checkpoint, validate and finish.
Episodes depend on (seed, step, task id) only and the checkpoint holds everything else, so a
resumed run ends where an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.algorithms.outer import agreement_columns, task_weights
from amfs_dist.backend import (
    GradientBackend,
    InProcessBackend,
    StepResult,
    apply_direction,
    resolve_device,
    set_deterministic,
)
from amfs_dist.config import Config, save_config
from amfs_dist.data import make_task_source
from amfs_dist.data.conflict import corrupted_tasks
from amfs_dist.errors import RunStopped, TrainingError, UserError  # TrainingError: re-exported
from amfs_dist.evaluate import evaluate_episodes
from amfs_dist.files import finite_or_none, torch_save, write_json, write_text
from amfs_dist.runs import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    RESULT,
    load_module_state,
    load_torch_file,
    read_metrics,
)
from amfs_dist.stopping import STOP_SIGNALS, StopRequested, raise_on_stop, signal_name

POSTFIX = {"loss": "loss", "acc": "acc", "val": "val_accuracy"}  # progress bar: label -> metric


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
        self.agreement_columns = agreement_columns(self.learner.layout, cfg.outer.agreement)
        self.step = 0
        self.bad_streak = 0
        self._backend = backend
        self._closed = False  # close() was called: the backend's workers are gone
        self.stop_signal: int | None = None
        self._updating = self._stop_now = False  # a second stop signal waits for the update
        self._validating = False  # a stop signal ends a validation at once
        self.remote = None  # a storage.RemoteRun when --out is a URI: run_dir is its local copy
        self._synced_step = None  # an update-owning backend's replicas are at this step
        self._pulled_step = None  # ... and this trainer's copy was fetched at this step
        self._checkpointed_step = None  # checkpoint.pt holds this step (None: not yet written)
        self._unwritable_step = None  # the step whose checkpoint could not be written
        # a resume's config: written only once the run has moved on under it, so that a
        # resume that fails first leaves the run as it was
        self.config_to_write: Config | None = None

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
        if self.step in (self._checkpointed_step, self._unwritable_step):
            return  # the file holds this step already (a failed resume changes nothing), or
            # writing it failed (a full disk): the error on its way out says so, once
        self.pull_state()
        self.write_config()
        self._unwritable_step = self.step
        torch_save({"step": self.step, "bad_streak": self.bad_streak,
                      "model": self.learner.module.state_dict(),
                      "optimizer": self.optimizer.state_dict(),
                      "torch_rng": torch.get_rng_state(),
                      "input_shape": list(self.source.input_shape)}, self.run_dir / CHECKPOINT)
        self._checkpointed_step, self._unwritable_step = self.step, None
        if self.remote is not None:
            self.remote.push()

    def write_config(self) -> None:
        if self.config_to_write is not None:
            save_config(self.config_to_write, self.run_dir / CONFIG)
            self.config_to_write = None

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
        self._checkpointed_step = self.step

    # -- one step --------------------------------------------------------------------------------
    def weigh(self, vectors: torch.Tensor | None, gram: torch.Tensor | None = None):
        o = self.cfg.outer
        if vectors is not None and self.agreement_columns is not None:  # outer.agreement
            vectors = vectors[:, self.agreement_columns.to(vectors.device)]
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

    def fit(self, progress: bool = True, on_step: Callable[[Trainer, dict], None] | None = None,
            on_validation: Callable[[Trainer, dict], None] | None = None) -> None:
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
                    log.write(json.dumps(finite_or_none(row), allow_nan=False) + "\n")
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
        if self._backend is not None and not self._closed:
            self._backend.close()
        self._closed = True


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
    write_text(path, "".join(json.dumps(finite_or_none(r), allow_nan=False) + "\n"
                             for r in rows))


def finish_run(trainer: Trainer, started: float, progress: bool = False, **extra) -> dict:
    """Save model.pt, evaluate on the test split, write result.json; returns the result."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    if trainer.step and trainer.bad_streak >= trainer.step:
        raise TrainingError(f"every one of the run's {trainer.step} steps was skipped: no task "
                            f"gave a finite gradient (see the bad_tasks column of "
                            f"{run_dir / 'metrics.jsonl'}); the model is untrained, so no "
                            f"model.pt or result.json was written")
    trainer.write_config()
    torch_save({"model": trainer.learner.module.state_dict(),
                "input_shape": list(trainer.source.input_shape)}, run_dir / MODEL)
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
    result = finite_or_none(result)  # e.g. test_ci95 of a single episode: no interval
    write_json(run_dir / RESULT, result)
    if trainer.remote is not None:
        trainer.remote.push()
    return result
