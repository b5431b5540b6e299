"""dist.exchange=collective on Ray Train: a TorchTrainer whose ranks each run the step loop.

Ray Train owns the worker group (`ScalingConfig`; `num_workers=(dist.min_workers,
dist.workers)` for an elastic run), torch.distributed among the ranks (gloo on the CPU, NCCL
on GPUs), restarts after a failure (`FailureConfig(max_failures=dist.max_worker_restarts)`,
from the last checkpoint reported) and checkpoint storage (`RunConfig(storage_path)`:
dist.storage_path, by default the run's own `ray-train/` folder; it must be storage every
node reaches when the ranks span nodes: a shared file system, s3:// or gs://).

Every rank holds a trainer (parameters, Adam state) and calls its one step code path with the
collective exchange (distributed.collective); rank 0 plays the driver's part there. The `amfs
train` process (this module's `fit`) only starts the TorchTrainer and follows it: rank 0
streams each step's metrics row to a small channel actor on this node, which this process
reads to write metrics.jsonl, show progress and answer Tune; checkpoints come back as Ray
Train checkpoints, copied to the run's checkpoint.pt; a stop signal here is passed to rank 0
through the same channel, and the ranks stop together at the end of a step. Nothing of size
P reaches this process except the checkpoints and the final model.

What Ray Train cannot do here, and the code kept for it (docs/scaling.md, Ray Train):
the address gloo and NCCL advertise (`AdvertisingTorchConfig`).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from amfs_dist.errors import RunStopped, TrainingError, UserError, WorkerFailedError

log = logging.getLogger("amfs_dist.distributed")

POLL_S = 0.5          # how often this process reads the channel
START_GRACE_S = 300.0  # added to the first step's bound: workers import torch, load data
STATE = "checkpoint.pt"  # in a Ray Train checkpoint
CHECKPOINT_NAME = "checkpoint.pt"  # in the run
STOP_WAIT_S = 30.0    # a stop waits this long at most for the ranks' checkpoint ...
IDLE_S = 10.0         # ... and not at all when no step has ended for this long (no worker runs)


# -- the channel between rank 0 and the `amfs train` process ------------------------------------------
class RunChannel:
    """Rank 0's metrics rows and events to the driver; the driver's stop request to rank 0."""

    def __init__(self):
        self._rows: list = []
        self._events: list = []
        self._stop = False
        self._latest = None  # the last checkpoint rank 0 reported

    def put(self, rows: list, events: list = ()) -> None:
        self._rows.extend(rows)
        self._events.extend(events)
        for event in events:
            self._latest = event["checkpoint"]

    def latest(self):
        return self._latest

    def take(self) -> tuple[list, list]:
        rows, events, self._rows, self._events = self._rows, self._events, [], []
        return rows, events

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


# -- the address gloo and NCCL advertise ----------------------------------------------------------
def _torch_config(timeout_s: float):
    """Ray Train's TorchConfig, whose group setup first names each rank the interface that
    routes to rank 0's node (collective.advertise_route_to). Ray Train 2.60 sets MASTER_ADDR
    to rank 0's node address but leaves gloo/NCCL to advertise the address the hostname
    resolves to: loopback on Debian-style hosts, where a two-node group then fails with
    `Gloo connectFullMesh failed ... remote=[127.0.0.1]` (docs/scaling.md, Ray Train)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class AdvertisingBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            import ray
            host = worker_group.execute_single(0, ray.util.get_node_ip_address)
            worker_group.execute(_advertise, host=host)
            super().on_start(worker_group, backend_config)

    class AdvertisingTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return AdvertisingBackend

    return AdvertisingTorchConfig(timeout_s=int(max(1, timeout_s)))


def _advertise(host: str) -> None:
    from amfs_dist.distributed.collective import SOCKET_IFNAMES, advertise_route_to
    user_set = [k for k in SOCKET_IFNAMES if os.environ.get(k)]
    address = advertise_route_to(host, 9, user_set)  # a UDP "connect" only picks the route
    log.info("collective rank advertises %s", address)


# -- each rank ----------------------------------------------------------------------------------------
def _rank_loop(config: dict) -> None:
    import ray
    import ray.train

    from amfs_dist.backend import InProcessBackend
    from amfs_dist.config import resolve
    from amfs_dist.distributed.collective import CollectiveExchange
    from amfs_dist.distributed.worker import pick_device
    from amfs_dist.train import Trainer

    cfg = resolve(config["cfg"], {})
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per report otherwise
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    channel = config["channel"]
    device = pick_device(cfg)
    if device.type == "cpu" and not cfg.train.deterministic:
        torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="amfs-rank-") as scratch:
        trainer = Trainer(cfg, Path(scratch), device=device,
                          source_factory=config.get("source_factory"))
        # a restarted group: Ray Train's last checkpoint, or the last one rank 0 reported here
        # (after an error of Ray Train's controller, get_checkpoint() had none: seen when a
        # group of the old size could not start within Ray Train's 60 s after a lost node)
        restored = ray.train.get_checkpoint() or ray.get(channel.latest.remote())
        if restored is not None:
            with restored.as_directory() as d:
                trainer.restore(torch.load(Path(d) / STATE, map_location=device,
                                           weights_only=False))
        else:
            trainer.restore(ray.get(config["state"]))
        exchange = CollectiveExchange(cfg, InProcessBackend(cfg, trainer.learner, trainer.source))
        trainer.use_backend(exchange)
        t = cfg.train
        stop_poll = channel.stop_requested.remote() if rank == 0 else None

        def report(kind: str, **extra) -> None:
            state = trainer.state_dict()
            name = f"{kind}_{trainer.step:07d}_w{world}"
            if rank != 0:
                ray.train.report({"step": trainer.step}, checkpoint=None, checkpoint_dir_name=name)
                return
            with tempfile.TemporaryDirectory(prefix="amfs-ckpt-") as d:
                torch.save(state, Path(d) / STATE)
                ray.train.report({"step": trainer.step},
                                 checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=name)
            channel.put.remote([], [{"kind": kind, "step": trainer.step,
                                     "checkpoint": ray.train.get_checkpoint(), **extra}])

        try:
            while trainer.step < t.steps:
                started = time.perf_counter()
                if rank == 0:  # the step's weights carry it to every rank (exchange.stop)
                    ready, _ = ray.wait([stop_poll], timeout=0)
                    if ready and ray.get(stop_poll):
                        exchange.stop = True
                    elif ready:
                        stop_poll = channel.stop_requested.remote()
                res = trainer.train_step()
                row = trainer.metrics_row(res)
                row["step_s"] = round(time.perf_counter() - started, 6)  # the loop's, whole
                if t.val_every and trainer.step % t.val_every == 0 and not exchange.stop:
                    val = trainer.validate()
                    row["val_accuracy"], row["val_loss"] = val["accuracy"], val["loss"]
                validated = "val_accuracy" in row
                if validated and trainer.step < t.steps:  # Tune's checkpoint is this step's
                    report("checkpoint")
                if rank == 0:
                    channel.put.remote([row])
                if trainer.bad_streak >= t.max_bad_steps:
                    report("failed", error=(
                        f"{t.max_bad_steps} consecutive steps without a finite task gradient "
                        f"(train.max_bad_steps) at step {trainer.step}; checkpoint kept in "
                        f"{config['location']}/{CHECKPOINT_NAME}"))
                    return
                if exchange.stop:
                    report("stopped")
                    return
                if (trainer.step % t.checkpoint_every == 0 and trainer.step < t.steps
                        and not validated):
                    report("checkpoint")
            test = None
            # a model worth testing (else finish_run says why not)
            if config["test"] and trainer.bad_streak < trainer.step:
                test = trainer.evaluate("test")
            report("final", test=test)
        finally:
            trainer.close()


# -- the `amfs train` process ------------------------------------------------------------------------
def storage_path(cfg, location) -> str:
    """dist.storage_path, else the run's own ray-train/ folder (local or object storage)."""
    if cfg.dist.storage_path:
        return cfg.dist.storage_path
    return f"{str(location).rstrip('/')}/ray-train"


def make_torch_trainer(cfg, location, state_ref, channel, source_factory=None,
                       test: bool = False):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import ScalingConfig

    from amfs_dist.distributed.backend import min_workers
    d = cfg.dist
    workers = d.workers if min_workers(cfg) == d.workers else (min_workers(cfg), d.workers)
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker
                                               else {})}
    return TorchTrainer(
        _rank_loop,
        train_loop_config={"cfg": cfg.to_flat(), "state": state_ref, "channel": channel,
                           "source_factory": source_factory, "test": test,
                           "location": str(location)},
        torch_config=_torch_config(d.timeout_s),
        # an elastic group looks for room to grow as often as a lost worker waits for room
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=d.gpus_per_worker > 0,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=d.replace_timeout_s),
        run_config=RunConfig(
            name="train", storage_path=storage_path(cfg, location),
            failure_config=FailureConfig(max_failures=d.max_worker_restarts),
            checkpoint_config=CheckpointConfig(num_to_keep=2)))


def fit(trainer, on_row, on_checkpoint, test: bool = False) -> dict | None:
    """Run trainer's remaining steps on Ray Train; with `test`, the ranks then run the test
    episodes and this returns their statistics. on_row(row) for each metrics row as it arrives (a
    recomputed step's row again, after a restart); on_checkpoint(step) after the trainer was
    given a checkpoint's state."""
    import ray

    from amfs_dist.distributed.cluster import init_ray
    owns_ray = init_ray(log_to_driver=True)  # False: Trainer.prepare joined Ray already
    cfg = trainer.cfg
    try:
        check_fits(cfg)
        here = ray.get_runtime_context().get_node_id()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        channel = ray.remote(RunChannel).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        ).remote()
        state_ref = ray.put(trainer.state_dict())
        torch_trainer = make_torch_trainer(cfg, trainer.location, state_ref, channel,
                                           trainer.source_factory, test)
        return _follow(trainer, torch_trainer, channel, on_row, on_checkpoint)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()


def check_fits(cfg) -> None:
    """Refuse at once workers the cluster can never place (the shard workers' check, which
    skips a Tune trial's placement group)."""
    from amfs_dist.distributed.backend import _check_workers_fit
    _check_workers_fit(cfg)


def _follow(trainer, torch_trainer, channel, on_row, on_checkpoint) -> dict | None:
    """Run the TorchTrainer in a thread and follow rank 0 from this one (signals land here)."""
    import ray
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = torch_trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    cfg = trainer.cfg
    thread = threading.Thread(target=run, name="amfs-ray-train", daemon=True)
    thread.start()
    # a restarted group starts its ranks anew (import torch, load data): every step gets the
    # start-up grace, since this process cannot tell a restart from a slow step
    bound = START_GRACE_S + cfg.dist.timeout_s + cfg.dist.replace_timeout_s
    log.warning("Ray Train runs %s worker(s); no step within %g s (dist.timeout_s + "
                "dist.replace_timeout_s + %g s to start workers) stops the run with its last "
                "checkpoint", _workers_said(cfg), bound, START_GRACE_S)
    last_heard = time.monotonic()
    stop_asked_at = None
    test, final, failed = None, False, None
    while True:
        done = not thread.is_alive()
        rows, events = ray.get(channel.take.remote(), timeout=60)
        if rows or events:
            last_heard = time.monotonic()
        stopped = False
        for event in events:  # first: a validation row's callbacks see its step's state
            with event["checkpoint"].as_directory() as d:
                state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
            trainer.restore(state)
            on_checkpoint(trainer.step)
            if event["kind"] == "final":
                test, final = event.get("test"), True
            stopped = stopped or event["kind"] == "stopped"
            failed = event.get("error") or failed
        for row in rows:
            on_row(row)
        if failed:
            raise TrainingError(failed)
        if stopped:
            raise RunStopped(trainer.stopped_message(), trainer.stop_signal)
        if done:
            break
        if trainer.stop_signal is not None and stop_asked_at is None:
            channel.request_stop.remote()
            stop_asked_at = time.monotonic()
            log.warning("stopping: the workers checkpoint at the end of their step (waiting at "
                        "most %g s)", STOP_WAIT_S)
        silent = time.monotonic() - last_heard
        if stop_asked_at is not None and (time.monotonic() - stop_asked_at > STOP_WAIT_S
                                          or silent > IDLE_S):  # no step is under way
            raise RunStopped(trainer.stopped_message(waiting=True), trainer.stop_signal)
        if silent > bound:
            raise WorkerFailedError(
                f"no step from the Ray Train workers for {silent:.0f} s (dist.timeout_s + "
                f"dist.replace_timeout_s + {START_GRACE_S:g} s): fewer workers than {_workers_said(cfg)} could run, "
                f"or a worker hangs. The run stops here; its checkpoint is kept (resume with "
                f"`amfs train --resume {trainer.location}`)")
        time.sleep(POLL_S)
    if "error" in outcome:
        raise _as_amfs_error(outcome["error"], trainer)
    if not final:
        raise TrainingError("the Ray Train run ended without its final report")
    return test


def _workers_said(cfg) -> str:
    from amfs_dist.distributed.backend import min_workers
    m = min_workers(cfg)
    return str(cfg.dist.workers) if m == cfg.dist.workers else f"{m} to {cfg.dist.workers}"


def _as_amfs_error(err: BaseException, trainer) -> BaseException:
    """Ray Train's TrainingFailedError as one line naming the rank's own error."""
    if isinstance(err, (UserError, TrainingError, RunStopped)):
        return err
    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover - every Ray we install has it
        return err
    if not isinstance(err, TrainingFailedError):
        return err
    text = " | ".join(line.strip() for line in str(err).strip().splitlines()[-4:] if line.strip())
    for cause in (TrainingError, UserError):
        if cause.__name__ in text:
            return cause(text)
    print(str(err), file=sys.stderr)
    return WorkerFailedError(f"the Ray Train workers failed past dist.max_worker_restarts="
                             f"{trainer.cfg.dist.max_worker_restarts}: {text}. The run stops "
                             f"here; its checkpoint is kept (resume with `amfs train --resume "
                             f"{trainer.location}`)")
