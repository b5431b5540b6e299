"""Meta-training: the driver loop, checkpoints, validation and the final test (the run
directory's life, start and resume, is lifecycle.py's).

The trainer owns the parameters and the optimiser; an exchange (backend.py: in-process, or
Ray shard workers with exact or sketch) returns each step's update direction, and the
trainer applies it. With dist.exchange=collective the same trainer runs in every rank of Ray
Train's worker group (distributed.raytrain), each with its replica, and the `amfs train`
process only follows rank 0. Episodes depend on (seed, step, task id) only and the
checkpoint holds everything else, so a resumed run ends where an uninterrupted one would.
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
    Exchange,
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

# progress bar: label -> metric (workers: how many computed the step, on Ray)
POSTFIX = {"loss": "loss", "acc": "acc", "val": "val_accuracy", "workers": "workers"}


def make_backend(cfg: Config, learner: MetaLearner, source, source_factory=None) -> Exchange:
    """The exchange of this process: in-process, or the driver of Ray shard workers. On Ray
    Train (on_ray_train) the ranks make their own, and this process evaluates in-process only
    what it is asked outside their fit (a Tune trial's last validation)."""
    if cfg.dist.workers == 0 or on_ray_train(cfg):
        return InProcessBackend(cfg, learner, source)
    from amfs_dist.distributed import RayBackend  # Ray only when asked for
    return RayBackend(cfg, source_factory)


def on_ray_train(cfg: Config) -> bool:
    """dist.exchange=collective with workers: the steps run in Ray Train's ranks."""
    return cfg.dist.workers > 0 and cfg.dist.exchange == "collective"


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, backend: Exchange | None = None,
                 device: str | torch.device | None = None,
                 source_factory: Callable[[Config], object] | None = None):
        """source_factory: cfg -> task source, for this process and every worker (fault
        drills: distributed.faults); default data.make_task_source."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        set_deterministic(cfg)
        torch.manual_seed(cfg.seed)
        self.source_factory = source_factory
        self.source = (source_factory or make_task_source)(cfg)
        self.learner = MetaLearner(cfg, self.source.input_shape, device or resolve_device(cfg))
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
        self.final_test: dict | None = None  # the test statistics the Ray Train ranks computed
        self._ray_owner: bool | None = None  # prepare() connected this process to Ray
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
    def backend(self) -> Exchange:
        if self._backend is None:
            self._backend = make_backend(self.cfg, self.learner, self.source,
                                         self.source_factory)
        return self._backend

    def use_backend(self, backend: Exchange) -> None:
        self._backend = backend

    def prepare(self) -> None:
        """Start the workers (or, on Ray Train, join Ray and check that the workers fit), so
        that a cluster that cannot hold them is refused before the run writes anything."""
        if not on_ray_train(self.cfg):
            _ = self.backend
        elif self._ray_owner is None:
            from amfs_dist.distributed.backend import check_settings
            from amfs_dist.distributed.cluster import init_ray
            from amfs_dist.distributed.raytrain import check_fits
            check_settings(self.cfg)
            self._ray_owner = init_ray(log_to_driver=True)
            check_fits(self.cfg)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a run continues from (checkpoint.pt); tensors on the CPU."""
        cpu = lambda x: x.detach().cpu() if torch.is_tensor(x) else x
        opt = self.optimizer.state_dict()
        opt["state"] = {k: {n: cpu(v) for n, v in st.items()} for k, st in opt["state"].items()}
        return {"step": self.step, "bad_streak": self.bad_streak,
                "model": {k: cpu(v) for k, v in self.learner.module.state_dict().items()},
                "optimizer": opt, "torch_rng": torch.get_rng_state(),
                "input_shape": list(self.source.input_shape)}

    def restore(self, state: dict) -> None:
        """The state of state_dict() (a checkpoint already checked by load_checkpoint)."""
        self.learner.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.bad_streak = int(state["step"]), int(state["bad_streak"])

    def save_checkpoint(self) -> None:
        if self.step in (self._checkpointed_step, self._unwritable_step):
            return  # the file holds this step already (a failed resume changes nothing), or
            # writing it failed (a full disk): the error on its way out says so, once
        self.write_config()
        self._unwritable_step = self.step
        torch_save(self.state_dict(), self.run_dir / CHECKPOINT)
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
        res = self.backend.direction(self.learner.flat_params(), self.step, task_ids, self.weigh)
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

    def evaluate(self, split: str, progress: bool = False) -> dict:
        """Validation (train.val_episodes) or test (eval.episodes) episodes, on the devices
        the exchange computes on (the shard workers' or the ranks', else this process's)."""
        n = self.cfg.train.val_episodes if split == "val" else self.cfg.eval.episodes
        return self.backend.evaluate(self.learner, split, n, self.cfg.eval.queries,
                                     self.cfg.eval.batch, progress)

    def validate(self) -> dict:
        return self.evaluate("val")

    def stopped_message(self, waiting: bool = False) -> str:
        name = signal_name(self.stop_signal) if self.stop_signal else "a stop"
        where = (f"at step {self.step} while waiting for workers" if waiting
                 else f"after step {self.step}")
        return (f"stopped by {name} {where}; checkpoint saved: resume with "
                f"`amfs train --resume {self.location}`")

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
            on_validation: Callable[[Trainer, dict], None] | None = None,
            test: bool = False) -> None:
        """The remaining steps. test: the run's final test follows (finish_run); on Ray Train
        the ranks then run it before they go (final_test)."""
        t = self.cfg.train
        metrics = self.run_dir / "metrics.jsonl"
        _truncate_metrics(metrics, self.step)
        bar = tqdm(total=t.steps, initial=self.step, desc=f"{self.cfg.method_name} meta-train",
                   disable=not progress, dynamic_ncols=True)

        def record(log, row: dict) -> None:
            """The step's row to the callbacks, metrics.jsonl and the progress bar
            (on_validation first: a Tune report adds the row to its own copy of the log)."""
            if on_validation and row.get("val_accuracy") is not None:
                on_validation(self, row)
            log.write(json.dumps(finite_or_none(row), allow_nan=False) + "\n")
            log.flush()
            bar.n = row["step"]
            if row["step"] % t.log_every == 0 or row["step"] == t.steps:
                bar.set_postfix({k: f"{row[v]}" if isinstance(row[v], int) else f"{row[v]:.3f}"
                                 for k, v in POSTFIX.items() if row.get(v) is not None},
                                refresh=False)
            bar.refresh()
            if on_step:
                on_step(self, row)

        self.prepare()  # before the handlers are set: ray.init sets its own
        try:
            with metrics.open("a") as log, self.stop_at_step_boundary():
                if on_ray_train(self.cfg):
                    self._fit_on_ray_train(metrics, log, record, test)
                while self.step < t.steps:
                    res = self.train_step()
                    row = self.metrics_row(res)
                    if t.val_every and self.step % t.val_every == 0 and self.stop_signal is None:
                        val = self._stoppable_validation()
                        if val is not None:
                            row["val_accuracy"], row["val_loss"] = val["accuracy"], val["loss"]
                    record(log, row)
                    if self.bad_streak >= t.max_bad_steps:
                        raise TrainingError(
                            f"{t.max_bad_steps} consecutive steps without a finite task gradient "
                            f"(train.max_bad_steps) at step {self.step}; checkpoint kept in "
                            f"{self.run_dir / CHECKPOINT}")
                    if self.step % t.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.stop_signal is not None:  # the last step's too: the test can wait
                        raise RunStopped(self.stopped_message(), self.stop_signal)
        except BaseException as e:
            try:
                self.save_checkpoint()  # nothing done so far is lost: resume from here
            except Exception as lost:
                print(f"could not checkpoint step {self.step} ({lost}); the last checkpoint "
                      f"is kept", file=sys.stderr)
            if isinstance(e, KeyboardInterrupt):
                print(f"\nstopped at step {self.step}; checkpoint saved: resume with "
                      f"`amfs train --resume {self.location}`", file=sys.stderr)
            raise
        finally:
            bar.close()
        self.save_checkpoint()

    def _fit_on_ray_train(self, metrics: Path, log, record, test: bool) -> None:
        """The steps on Ray Train's ranks (distributed.raytrain); this process writes their
        rows and checkpoints. A row for a step already written (the ranks restarted from
        their last checkpoint, after a failure or a resize) replaces the rows from there on."""
        from amfs_dist.distributed import raytrain
        last, logs = [self.step], [log]

        def on_row(row: dict) -> None:
            if row["step"] <= last[0]:
                logs[0].flush()
                _truncate_metrics(metrics, row["step"] - 1)  # a new file: write to it
                if logs[0] is not log:
                    logs[0].close()
                logs[0] = metrics.open("a")
                print(f"steps {row['step']}..{last[0]} are recomputed: the workers restarted "
                      f"from their checkpoint at step {row['step'] - 1}", file=sys.stderr)
            last[0] = row["step"]
            record(logs[0], row)

        def on_checkpoint(step: int) -> None:
            self.save_checkpoint()

        try:
            self.final_test = raytrain.fit(self, on_row, on_checkpoint, test)
        finally:
            if logs[0] is not log:
                logs[0].close()

    def close(self) -> None:
        if self._backend is not None and not self._closed:
            self._backend.close()
        self._closed = True
        if self._ray_owner:
            import ray
            if ray.is_initialized():
                ray.shutdown()
            self._ray_owner = False


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
    test = trainer.final_test or trainer.evaluate("test", progress)
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
