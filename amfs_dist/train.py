"""Meta-training: the driver loop, checkpoints, resume, validation and the final test.

The driver owns the parameters and the optimiser; a backend (in-process or Ray shards)
returns each step's update direction. Episodes depend on (seed, step, task id) only and the
checkpoint holds everything else, so a resumed run ends where an uninterrupted one would.
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
from amfs_dist.backend import GradientBackend, InProcessBackend, StepResult
from amfs_dist.config import Config, load_config, save_config
from amfs_dist.data import make_task_source
from amfs_dist.data.conflict import corrupted_tasks
from amfs_dist.errors import RunStopped, UserError
from amfs_dist.evaluate import evaluate_episodes, resolve_device

CHECKPOINT = "checkpoint.pt"
POSTFIX = {"loss": "loss", "acc": "acc", "val": "val_accuracy"}  # progress bar: label -> metric
# Slurm (USR1 before the time limit, TERM on preemption), Kubernetes and `ray job stop` (TERM)
# and Ctrl-C (INT) all mean: finish this step, checkpoint, exit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingError(UserError):
    """The run cannot go on (e.g. too many steps without a finite gradient); a checkpoint is kept."""

    exit_code = 1


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.method_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def make_backend(cfg: Config, learner: MetaLearner, source) -> GradientBackend:
    if cfg.dist.workers == 0:
        return InProcessBackend(cfg, learner, source)
    from amfs_dist.distributed import RayBackend  # Ray is imported only when asked for
    return RayBackend(cfg)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, backend: GradientBackend | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        torch.manual_seed(cfg.seed)
        self.source = make_task_source(cfg)
        self.learner = MetaLearner(cfg, self.source.input_shape, resolve_device(cfg))
        self.optimizer = torch.optim.Adam(self.learner.params().values(), lr=cfg.train.lr)
        self.step = 0
        self.bad_streak = 0
        self._backend = backend
        self.stop_signal: int | None = None
        self._updating = self._stop_now = False  # a second stop signal waits for the update

    @property
    def backend(self) -> GradientBackend:
        if self._backend is None:
            self._backend = make_backend(self.cfg, self.learner, self.source)
        return self._backend

    # -- state -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        _atomic_save({"step": self.step, "bad_streak": self.bad_streak,
                      "model": self.learner.module.state_dict(),
                      "optimizer": self.optimizer.state_dict(),
                      "torch_rng": torch.get_rng_state()}, self.run_dir / CHECKPOINT)

    def load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise UserError(f"{self.run_dir}: no {CHECKPOINT} to resume from")
        state = torch.load(path, map_location=self.learner.device, weights_only=True)
        self.learner.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.bad_streak = int(state["step"]), int(state["bad_streak"])

    # -- one step --------------------------------------------------------------------------------
    def weigh(self, vectors: torch.Tensor):
        o = self.cfg.outer
        return task_weights(vectors, self.cfg.outer_weighting, o.normalize, o.temperature)

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        task_ids = list(range(self.cfg.train.meta_batch))
        res = self.backend.direction(self.learner.flat_params(), self.step, task_ids, self.weigh)
        t1 = time.perf_counter()
        self._updating = True
        if res.direction is not None:
            grads = self.learner.layout.unflatten(res.direction.to(self.learner.device))
            for name, p in self.learner.params().items():
                p.grad = grads[name].to(p.dtype)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
        res.timings["update_s"] = time.perf_counter() - t1
        res.timings["step_s"] = time.perf_counter() - t0
        self.step += 1
        self._updating = False
        if self._stop_now:
            raise KeyboardInterrupt
        return res

    def metrics_row(self, res: StepResult) -> dict:
        finite = res.finite.cpu()
        row = {"step": self.step, "skipped": res.direction is None, "bad_tasks": res.bad_tasks,
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
        """While training, a stop signal ends the current step, then checkpoints and stops.

        A second signal stops at once (KeyboardInterrupt): the checkpoint then holds the last
        finished step. Handlers can only be set from the main thread (a Tune trial runs fit in
        another one, and Tune stops it its own way), so elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self.stop_signal is None:
                self.stop_signal = signum
            elif self._updating:  # parameters half updated: stop right after the update
                self._stop_now = True
            else:
                raise KeyboardInterrupt

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def validate(self) -> dict:
        t = self.cfg.train
        return evaluate_episodes(self.learner, self.source, "val", t.val_episodes,
                                 self.cfg.eval.queries, self.cfg.eval.batch)

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
                    if t.val_every and self.step % t.val_every == 0:
                        val = self.validate()
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
                    if self.stop_signal is not None and self.step < t.steps:
                        name = signal.Signals(self.stop_signal).name
                        raise RunStopped(f"stopped by {name} after step {self.step}; checkpoint "
                                         f"saved: resume with `amfs train --resume "
                                         f"{self.run_dir}`", self.stop_signal)
        except BaseException as e:
            self.save_checkpoint()  # nothing done so far is lost: resume from here
            if isinstance(e, KeyboardInterrupt):
                print(f"\nstopped at step {self.step}; checkpoint saved: resume with "
                      f"`amfs train --resume {self.run_dir}`", file=sys.stderr)
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
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def run_training(cfg: Config | None = None, out: str | Path | None = None,
                 resume: str | Path | None = None, progress: bool = True,
                 overrides: list[str] | None = None, backend: GradientBackend | None = None,
                 on_step=None, on_validation=None) -> dict:
    """`amfs train`: train, evaluate on the test split, write result.json; returns the result."""
    started = time.perf_counter()
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        run_dir = Path(out) if out else default_run_dir(cfg)
        if (run_dir / CHECKPOINT).exists():
            raise UserError(f"--out {run_dir}: holds a run already; resume it with "
                            f"`amfs train --resume {run_dir}` or choose another --out")
    trainer = Trainer(cfg, run_dir, backend)  # bad data or model settings fail before any write
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    try:
        if resume is not None:
            trainer.load_checkpoint()
        trainer.fit(progress=progress, on_step=on_step, on_validation=on_validation)
    finally:
        trainer.close()
    return finish_run(trainer, started, progress, resumed=resume is not None)


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
    return result
