"""Running a sweep: the trial function, its placement group, the Tuner, and resuming.

A trial is a training driver (tuning/README.md): it builds a Trainer from base config + sampled values,
reports validation metrics to Tune at every validation (train.val_every steps) together with a
Tune checkpoint (the trainer's checkpoint.pt, config.yaml and metrics.jsonl), and resumes from
the latest Tune checkpoint when Tune restarts it. Its resources are a placement group: one
bundle for the driver (sweep.trial_cpus / trial_gpus) and one per distributed worker
(dist.cpus_per_worker / gpus_per_worker); Tune captures the worker actors the driver creates
into that group.

Layout of --out:  sweep.yaml (the resolved sweep, read back by --resume), tune/ (Ray Tune's
experiment: trial dirs and their checkpoints), then the results written by results.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pyarrow.fs import FileType

from amfs_dist.config import resolve, save_config
from amfs_dist.errors import UserError
from amfs_dist.stopping import signal_name
from amfs_dist.storage import is_uri, staged_run
from amfs_dist.tune.space import SweepSpec, load_sweep

SWEEP_FILE = "sweep.yaml"
EXPERIMENT = "tune"
CKPT_FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl")


class SweepInterrupted(UserError):
    """The sweep stopped before every trial finished; its state is saved for --resume."""

    exit_code = 130


class SweepFailed(UserError):
    """Ray Tune itself failed (not one trial: those are retried, then marked errored)."""

    exit_code = 1


# -- the trial ------------------------------------------------------------------------------------
def train_trial(config: dict, metric: str = "val_accuracy") -> None:
    """One Tune trial: train the config, report metrics + a checkpoint at every validation."""
    from ray import tune

    from amfs_dist.train import Trainer, TrainingError

    cfg = resolve({}, dict(config))
    run_dir = _scratch_dir(tune.get_context())
    trainer = None
    try:
        restored = tune.get_checkpoint()
        if restored is not None:  # Tune restarted this trial: go on from its latest checkpoint
            with restored.as_directory() as d:
                for name in CKPT_FILES:
                    if (Path(d) / name).is_file():
                        shutil.copy2(Path(d) / name, run_dir / name)
        save_config(cfg, run_dir / "config.yaml")
        trainer = Trainer(cfg, run_dir)
        resumed_from = 0
        if restored is not None:
            trainer.load_checkpoint()
            resumed_from = trainer.step
        started = time.perf_counter()
        reported = {"step": None}

        def report(row: dict, step_row: bool = True, diverged: bool = False) -> None:
            """Metrics + a checkpoint of run_dir; step_row: the row is the step's metrics.jsonl
            row, which fit writes only after this callback, so the checkpoint gets it here."""
            metrics = {"step": trainer.step, "resumed_from": resumed_from,
                       "train_loss": row.get("loss"), "train_acc": row.get("acc"),
                       "val_loss": row.get("val_loss"), "val_accuracy": row.get("val_accuracy"),
                       "trial_s": time.perf_counter() - started, "diverged": diverged}
            if diverged:  # the worst score, so ASHA and TPE learn that this region fails
                metrics[metric] = 0.0 if metric == "val_accuracy" else float("nan")
            metrics = {k: v for k, v in metrics.items() if v is not None}
            with tempfile.TemporaryDirectory(prefix="amfs-ckpt-") as tmp:
                for name in CKPT_FILES:
                    if (run_dir / name).is_file():
                        shutil.copy2(run_dir / name, Path(tmp) / name)
                if step_row:
                    with open(Path(tmp) / "metrics.jsonl", "a") as log:
                        log.write(json.dumps(row) + "\n")
                reported["step"] = trainer.step
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

        def on_validation(tr, row: dict) -> None:
            tr.save_checkpoint()
            report(row)

        try:
            trainer.fit(progress=False, on_validation=on_validation)
        except TrainingError as e:
            if type(e) is not TrainingError:  # e.g. lost distributed workers: Tune retries the
                raise                          # trial from its checkpoint (sweep.max_failures)
            report({}, step_row=False, diverged=True)  # no finite gradient for too long
            return
        if reported["step"] != trainer.step:  # train.steps not a multiple of val_every, or a
            val = trainer.validate()          # trial restored at its last step: report the end
            report({"val_accuracy": val["accuracy"], "val_loss": val["loss"]}, step_row=False)
    finally:
        if trainer is not None:
            trainer.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _scratch_dir(ctx) -> Path:
    """The trial's run dir: scratch space outside the trial dir (which Tune syncs as artifacts),
    since what persists is the Tune checkpoint reported at every validation. Named after the
    trial, so a trial killed by an interruption leaves one such dir, reused when it resumes."""
    key = hashlib.sha1(str(ctx.get_trial_dir()).encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / "amfs-tune" / f"{ctx.get_trial_id()}-{key}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# -- the Tuner ------------------------------------------------------------------------------------
def make_trainable(spec: SweepSpec):
    from ray import tune
    pgf = tune.PlacementGroupFactory(spec.bundles(), strategy="PACK")
    return tune.with_resources(tune.with_parameters(train_trial, metric=spec.metric), pgf)


def _points(spec: SweepSpec) -> list[dict]:
    from amfs_dist.config import flatten
    return [flatten(p) for p in spec.settings.points_to_evaluate]


def make_tuner(spec: SweepSpec, out: Path | str, progress: bool):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = spec.settings
    sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials)
    searcher = OptunaSearch(sampler=sampler, points_to_evaluate=_points(spec) or None)
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.max_reports,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(
        metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
        num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent_trials,
        reuse_actors=True, trial_dirname_creator=_trial_dirname)
    return tune.Tuner(make_trainable(spec), param_space=spec.param_space(),
                      tune_config=tune_config, run_config=_run_config(spec, out, progress))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _run_config(spec: SweepSpec, out: Path | str, progress: bool):
    from ray import tune
    s = spec.settings
    return tune.RunConfig(
        name=EXPERIMENT, storage_path=str(out),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        progress_reporter=make_reporter(spec) if progress else None,
        verbose=1 if progress else 0)


def make_reporter(spec: SweepSpec):
    """A compact live table: status, swept values (short names), metric, steps."""
    from ray import tune
    names = {}
    for key in spec.search:
        short = key.split(".")[-1]
        names[key] = short if short not in names.values() else key
    metrics = {spec.metric: spec.metric, "step": "step", "training_iteration": "reports"}
    return tune.CLIReporter(parameter_columns=names, metric_columns=metrics,
                            max_report_frequency=15, sort_by_metric=True,
                            max_progress_rows=30)  # metric/mode: from TuneConfig


# -- Ray ------------------------------------------------------------------------------------------
def sweep_ray(spec: SweepSpec):
    """Ray for the sweep: RAY_ADDRESS's cluster, else a private one on 127.0.0.1 that ends with
    the sweep (distributed.cluster). A trial's placement group the cluster can never hold is
    refused here, at once: Tune would leave the trials pending for ever."""
    from amfs_dist.distributed.cluster import ray_for_tasks
    s, d = spec.settings, spec.base.dist
    return ray_for_tasks([(spec.bundles(), f"a trial (sweep.trial_cpus={s.trial_cpus:g}, "
                           f"sweep.trial_gpus={s.trial_gpus:g}, dist.workers={d.workers} x "
                           f"(dist.cpus_per_worker={d.cpus_per_worker:g}, "
                           f"dist.gpus_per_worker={d.gpus_per_worker:g}))")])


def _tune_env() -> None:
    from amfs_dist.distributed.raycompat import tune_legacy_output
    tune_legacy_output()  # Tune shows a passed-in CLIReporter only with its legacy output engine
    # trials checkpoint at every validation on purpose; Tune would warn about frequent syncs
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


# -- entry points ---------------------------------------------------------------------------------
def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True) -> dict:
    """Run a new sweep into `out`; returns the summary dict (see results.write_results).
    An s3:// or gs:// `out` holds Tune's experiment directly (storage_path); the results are
    written into a local copy and uploaded at the end."""
    if is_uri(out):
        with staged_run(str(out), (SWEEP_FILE,)) as remote:
            if remote.info(SWEEP_FILE).type != FileType.NotFound or \
                    remote.info(EXPERIMENT).type != FileType.NotFound:
                raise UserError(f"--out {remote.uri}: holds a sweep already; continue it with "
                                f"`amfs tune --resume {remote.uri} --allow-pickle` or choose "
                                f"another --out")
            with sweep_ray(spec):
                spec.save(remote.local / SWEEP_FILE)
                remote.push([SWEEP_FILE])
                try:
                    return _fit(spec, remote.local, progress,
                                lambda: make_tuner(spec, remote.uri, progress), remote.uri)
                finally:
                    remote.push(None)
    out = Path(out).resolve()
    if (out / EXPERIMENT).exists() or (out / SWEEP_FILE).exists():
        raise UserError(f"--out {out}: holds a sweep already; continue it with "
                        f"`amfs tune --resume {out} --allow-pickle` or choose another --out")
    with sweep_ray(spec):  # before anything is written: a bad request leaves no sweep dir
        out.mkdir(parents=True, exist_ok=True)
        spec.save(out / SWEEP_FILE)
        return _fit(spec, out, progress, tuner_factory=lambda: make_tuner(spec, out, progress))


def start_or_resume_sweep(spec: SweepSpec, out: str | Path, progress: bool = True,
                          allow_pickle: bool = False) -> dict:
    """`amfs tune --out OUT --resume-if-exists`, for launchers that may run the same command
    twice (a Slurm requeue, a resubmit): continue the sweep in `out` when it holds this very
    sweep (the same resolved sweep.yaml), else start it there."""
    if is_uri(out):
        with staged_run(str(out), (SWEEP_FILE,)) as remote:
            stored = remote.local / SWEEP_FILE
            held = load_sweep(stored, check_paths=False) if stored.is_file() else None
    else:
        stored = Path(out) / SWEEP_FILE
        held = load_sweep(stored, check_paths=False) if stored.is_file() else None
    if held is None:
        return run_sweep(spec, out, progress)
    if held.to_yaml_dict() != spec.to_yaml_dict():
        differ = sorted(k for k in ("base", "search", "sweep")
                        if held.to_yaml_dict()[k] != spec.to_yaml_dict()[k])
        raise UserError(f"--out {out}: holds another sweep (its {SWEEP_FILE} differs in "
                        f"{', '.join(differ)}); continue it as it is with `amfs tune --resume "
                        f"{out} --allow-pickle`, or choose another --out")
    return resume_sweep(out, progress, allow_pickle=allow_pickle)


def resume_sweep(out: str | Path, progress: bool = True, restart_errored: bool = False,
                 allow_pickle: bool = False, storage: str | None = None) -> dict:
    """Continue an interrupted sweep: unfinished trials go on from their latest checkpoints,
    errored ones too (or from scratch with restart_errored). Tune's saved state is a pickle:
    it is loaded only with allow_pickle (--allow-pickle)."""
    if is_uri(out):
        with staged_run(str(out), (SWEEP_FILE,)) as remote:
            try:
                return resume_sweep(remote.local, progress, restart_errored, allow_pickle,
                                    remote.uri)  # storage: the URI, named in messages too
            finally:
                remote.push(None)
    out = Path(out).resolve()
    if not (out / SWEEP_FILE).is_file():
        raise UserError(f"--resume {out}: not a sweep directory (no {SWEEP_FILE})")
    spec = load_sweep(out / SWEEP_FILE)
    if not allow_pickle:
        raise UserError(f"--resume {out}: continuing a sweep loads Ray Tune's saved state "
                        f"({out / EXPERIMENT}/*.pkl), a pickle that can run code when loaded; "
                        f"pass --allow-pickle if you trust {out}")
    exp = f"{storage}/{EXPERIMENT}" if storage else out / EXPERIMENT  # storage: the URI

    def factory():
        from ray import tune
        if not tune.Tuner.can_restore(str(exp)):
            raise UserError(f"--resume {out}: the sweep never started (no Tune state in {exp}); "
                            f"start it again with --out")
        return tune.Tuner.restore(str(exp), trainable=make_trainable(spec),
                                  resume_unfinished=True, resume_errored=not restart_errored,
                                  restart_errored=restart_errored)
    with sweep_ray(spec):
        return _fit(spec, out, progress, factory, storage)


@contextmanager
def _term_stops_tune():
    """Within the block, TERM stops the sweep as Ctrl-C and USR1 do: by Tune's own handler,
    which Tuner.fit sets on INT and USR1 (Tune saves its state; trials keep their checkpoints).
    Yields a list that gets the signal number."""
    import signal
    import threading
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_term(signum, frame):
        received.append(signum)
        tune_handler = signal.getsignal(signal.SIGINT)
        if callable(tune_handler) and tune_handler is not on_term:
            tune_handler(signum, frame)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit(spec: SweepSpec, out: Path, progress: bool, tuner_factory,
         location: str | None = None) -> dict:
    from amfs_dist.tune.results import collect, write_results

    _tune_env()
    import warnings
    # a trial resumed from a checkpoint re-reports validations Optuna has already seen
    warnings.filterwarnings("ignore", message="The reported value is ignored because")
    t0 = time.perf_counter()
    tuner = tuner_factory()
    try:
        with _term_stops_tune() as received:
            grid = tuner.fit()
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        import traceback
        (out / "error.txt").write_text(traceback.format_exc())
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        hint = (f"continue with `amfs tune --resume {location or out} --allow-pickle`"
                if (out / EXPERIMENT).is_dir() else "nothing to resume")
        raise SweepFailed(f"the sweep failed: {type(e).__name__}: "
                          f"{lines[0][:300] if lines else ''} (traceback in "
                          f"{out / 'error.txt'}; {hint})") from e
    # a trial is over when it errored or its last result is final (done: it returned, or
    # ASHA stopped it); after Ctrl+C the others are left running in the saved state
    unfinished = sum(1 for r in grid if r.error is None and not (r.metrics or {}).get("done"))
    unfinished += max(0, spec.settings.num_samples - len(grid))
    if unfinished:
        stopped = SweepInterrupted(
            f"sweep {'stopped by ' + signal_name(received[0]) if received else 'interrupted'} "
            f"with {unfinished} of {spec.settings.num_samples} trials unfinished; its state "
            f"and its trials' checkpoints are saved: continue with "
            f"`amfs tune --resume {location or out} --allow-pickle`")
        if received:
            stopped.exit_code = 128 + received[0]
        raise stopped
    trials = collect(grid, spec)
    summary = write_results(trials, spec, out, wall_s=time.perf_counter() - t0,
                            location=location)
    return summary


def print_summary(summary: dict, file=None) -> None:
    file = file or sys.stdout
    print(summary["line"], file=file, flush=True)


__all__ = ["run_sweep", "resume_sweep", "train_trial", "make_tuner", "SweepInterrupted",
           "print_summary"]
