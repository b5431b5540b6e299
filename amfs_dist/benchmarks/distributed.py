"""`amfs bench distributed`: Ray shard workers against in-process, and exact against sketch.

Scaling (one JSON line per meta-batch T and worker count W): meta-training step time, tasks/s,
the step split into sampling, compute, transfer, weighting and update (as in metrics.jsonl),
the driver's share (weighting + update over the step) and, for W >= 1, the step time against
W = 0 on the same settings (overhead_vs_in_process = step_s(W) / step_s(0) - 1). The settings
are the config's (default: the synthetic glyphs, Conv-4, 5-way 1-shot 15 queries).

Exchange (one JSON line per exchange): the same steps (same parameters, step and tasks) with
dist.exchange=exact and =sketch on ResNet-12 (12.4M parameters at width 64) over --exchange-
workers workers: bytes moved per step (parameters to each worker plus everything sent back),
step time and its transfer part, and how far the sketch's update direction is from the exact
one (cosine, and the L1 distance of the O-AMFS weights).

Grid (one JSON line per backbone, worker count and exchange: exact, sketch, collective with
exact weights, collective with sketch weights): whole trainer steps (update included, on the
driver or on the workers), with the bytes through the driver per step (`driver_bytes`), the
bytes one worker sends and receives per step (`worker_bytes`, the busiest worker; for the
collective exchange the data it sends in its collective calls) and the step split into
sampling_wait (the part of sampling not overlapped), compute, transfer (the rest of the
driver's wait: scheduling, the object store and the collective calls), collective (the
workers' time in collective calls), weighting and update. --grid-workers "" skips it.

Deterministic (one JSON line): in-process steps with train.deterministic false and true,
interleaved, on the config's settings (--deterministic-steps 0 skips it): tasks/s of each and
their ratio. Both use --cpus-per-worker threads (the deterministic mode's one thread when that
is 1), so the ratio is the cost of one task per vmapped chunk and the ordered sums.

Workers are started once per worker count (their start-up and first pass are excluded by the
warm-up steps) and the settings' steps are interleaved, so that other load on the machine
hits all of them alike. W=0 computes with --cpus-per-worker threads, like one worker. Without
a running cluster a local Ray instance is started, with RAY_AUTH_MODE=disabled unless it is
set, and with its workers at nice 0 like the driver (Ray's default is 15, which only matters
when other processes compete for the cores).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from amfs_dist.benchmarks.common import add_config_arguments, emit, machine
from amfs_dist.config import Config, load_config

TIMING_KEYS = ("sampling_s", "compute_s", "transfer_s", "weighting_s", "update_s")
GRID_KEYS = ("sampling_s", "sampling_wait_s", "compute_s", "transfer_s", "collective_s",
             "weighting_s", "update_s")
EXCHANGES = {"exact": {"dist.exchange": "exact"}, "sketch": {"dist.exchange": "sketch"},
             "collective": {"dist.exchange": "collective", "dist.weights_from": "exact"},
             "collective-sketch": {"dist.exchange": "collective", "dist.weights_from": "sketch"}}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def register(sub) -> None:
    p = sub.add_parser("distributed", help="Ray shard workers vs in-process; exact vs sketch exchange",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--workers", default="0,1,2", help="worker counts to time (default 0,1,2)")
    p.add_argument("--meta-batches", default="8,32",
                   help="meta-batch sizes T to time (default 8,32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="dist.cpus_per_worker (default 1); a worker computes with that many "
                        "threads, and so does the in-process baseline (W=0): equal compute")
    p.add_argument("--exchange-workers", type=int, default=2,
                   help="workers for the exact/sketch comparison (0: skip it; default 2)")
    p.add_argument("--exchange-backbone", default="resnet12", help="backbone (default resnet12)")
    p.add_argument("--exchange-width", type=int, default=64,
                   help="its width (default 64: 12.4M parameters)")
    p.add_argument("--exchange-meta-batch", type=int, default=8, help="T (default 8)")
    p.add_argument("--exchange-queries", type=int, default=1,
                   help="queries per class, kept small so that CPUs finish (default 1)")
    p.add_argument("--exchange-steps", type=int, default=3, help="timed steps each (default 3)")
    p.add_argument("--exchange-warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--sketch-dim", type=int, default=None, help="dist.sketch_dim (default: config)")
    p.add_argument("--grid-workers", default="1,2,3,4",
                   help="worker counts of the exchange grid (default 1,2,3,4; '' skips it)")
    p.add_argument("--grid-backbones", default="conv4,resnet12",
                   help="backbones of the grid (default conv4,resnet12)")
    p.add_argument("--grid-width", type=int, default=None,
                   help="their width (default: each backbone's own)")
    p.add_argument("--grid-exchanges", default=",".join(EXCHANGES),
                   help=f"exchanges of the grid (default {','.join(EXCHANGES)})")
    p.add_argument("--grid-meta-batch", type=int, default=8, help="T (default 8)")
    p.add_argument("--grid-queries", type=int, default=1, help="queries per class (default 1)")
    p.add_argument("--grid-steps", type=int, default=2, help="timed steps each (default 2)")
    p.add_argument("--grid-warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--deterministic-steps", type=int, default=3,
                   help="timed steps of the train.deterministic comparison (default 3; 0 skips)")
    add_config_arguments(p)
    p.set_defaults(func=run)


def _ensure_ray(num_cpus: float | None = None):
    """Join RAY_ADDRESS's cluster, or start a private one (distributed.cluster) with at least
    `num_cpus` logical CPUs (idle workers of the settings not being timed hold CPUs without
    using them)."""
    import ray

    from amfs_dist.distributed.cluster import init_ray
    if not ray.is_initialized():
        # Ray runs worker processes at nice 15; the in-process baseline runs at the driver's
        # niceness. Equal priority, so that other load on the machine does not favour W=0.
        os.environ.setdefault("RAY_worker_niceness", "0")
        cpus = max(os.cpu_count() or 1, math.ceil(num_cpus or 0))
        init_ray(log_to_driver=False, num_cpus=cpus)
    return ray


def scaling(base: Config, workers: list[int], meta_batches: list[int], steps: int, warmup: int,
            cpus: float) -> list[dict]:
    """Trainer steps for every (W, T), interleaved step by step so that a change in the
    machine's load hits every setting alike; one backend per W serves all T."""
    from amfs_dist.train import Trainer

    backends: dict[int, object] = {}
    trainers: dict[tuple[int, int], Trainer] = {}
    tmp = tempfile.TemporaryDirectory()
    try:
        for w in workers:
            cfg_w = base.replace(**{"dist.workers": w, "dist.cpus_per_worker": cpus,
                                    "train.val_every": 0})
            if w:
                _ensure_ray(cpus * sum(workers))
                from amfs_dist.distributed import RayBackend
                backends[w] = RayBackend(cfg_w)
            for T in meta_batches:
                trainers[w, T] = Trainer(cfg_w.replace(**{"train.meta_batch": T}),
                                         f"{tmp.name}/{w}-{T}", backend=backends.get(w))
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer.train_step()
        sums = {key: dict.fromkeys(TIMING_KEYS + ("wall", "bytes"), 0.0) for key in trainers}
        for _ in range(steps):
            for key, trainer in trainers.items():
                t0 = time.perf_counter()
                res = trainer.train_step()
                acc = sums[key]
                acc["wall"] += time.perf_counter() - t0
                acc["bytes"] += res.timings.get("exchange_bytes", 0)
                for k in TIMING_KEYS:
                    acc[k] += res.timings.get(k, 0.0)
    finally:
        for backend in backends.values():
            backend.close()
        tmp.cleanup()
    out = []
    for (w, T), acc in sums.items():
        cfg = trainers[w, T].cfg
        step_s = acc["wall"] / steps
        out.append({"bench": "distributed", "part": "scaling", "workers": w, "meta_batch": T,
                    "backbone": cfg.backbone, "params": trainers[w, T].learner.layout.size,
                    "ways": cfg.data.ways, "shots": cfg.data.shots, "queries": cfg.data.queries,
                    "threads_per_worker": max(1, int(cpus)), "steps": steps,
                    "step_s": round(step_s, 5), "tasks_per_s": round(T / step_s, 3),
                    **{k: round(acc[k] / steps, 5) for k in TIMING_KEYS},
                    "driver_share": round((acc["weighting_s"] + acc["update_s"]) / acc["wall"], 5),
                    "exchange_bytes_per_step": int(acc["bytes"] // steps)})
    return out


def exchange(base: Config, args) -> list[dict]:
    """The same steps through exact and sketch exchange, on the same workers."""
    from amfs_dist.algorithms.learner import MetaLearner
    from amfs_dist.algorithms.outer import task_weights
    from amfs_dist.data import make_task_source
    from amfs_dist.distributed import RayBackend

    _ensure_ray(args.cpus_per_worker * args.exchange_workers)
    over = {"dist.workers": args.exchange_workers, "model.backbone": args.exchange_backbone,
            "model.width": args.exchange_width, "train.meta_batch": args.exchange_meta_batch,
            "data.queries": args.exchange_queries, "dist.cpus_per_worker": args.cpus_per_worker}
    if args.sketch_dim:
        over["dist.sketch_dim"] = args.sketch_dim
    cfg = base.replace(**over)
    torch.manual_seed(cfg.seed)
    learner = MetaLearner(cfg, make_task_source(cfg).input_shape, "cpu")
    flat = learner.flat_params()
    o = cfg.outer
    weigh = lambda v: task_weights(v, cfg.outer_weighting, o.normalize, o.temperature)
    ids = list(range(cfg.train.meta_batch))
    backend = RayBackend(cfg)
    stats = {m: {"wall": 0.0, **dict.fromkeys(TIMING_KEYS[:4], 0.0), "bytes": 0}
             for m in ("exact", "sketch")}
    cosines, l1s = [], []
    try:
        for step in range(args.exchange_warmup + args.exchange_steps):
            results = {}
            for mode in ("exact", "sketch"):
                backend.exchange = mode  # the workers serve both protocols
                t0 = time.perf_counter()
                results[mode] = res = backend.direction(flat, step, ids, weigh)
                wall = time.perf_counter() - t0
                if step >= args.exchange_warmup:
                    s = stats[mode]
                    s["wall"] += wall
                    s["bytes"] += res.timings["exchange_bytes"]
                    for k in TIMING_KEYS[:4]:
                        s[k] += res.timings.get(k, 0.0)
            if step >= args.exchange_warmup:
                e, s = results["exact"], results["sketch"]
                cosines.append(float(torch.nn.functional.cosine_similarity(
                    e.direction.double(), s.direction.double(), dim=0)))
                l1s.append(float((e.weights.weights - s.weights.weights).abs().sum()))
    finally:
        backend.close()
    n = args.exchange_steps
    rows = []
    for mode, s in stats.items():
        row = {"bench": "distributed", "part": "exchange", "exchange": mode,
               "workers": cfg.dist.workers, "backbone": cfg.backbone, "params": flat.numel(),
               "meta_batch": len(ids), "queries": cfg.data.queries, "steps": n,
               "sketch_dim": cfg.dist.sketch_dim if mode == "sketch" else None,
               "exchange_bytes_per_step": s["bytes"] // n,
               "direction_s": round(s["wall"] / n, 4),
               **{k: round(s[k] / n, 4) for k in TIMING_KEYS[:4]}}
        if mode == "sketch":
            row["direction_cosine_vs_exact"] = round(min(cosines), 5)
            row["weights_l1_vs_exact"] = round(max(l1s), 5)
        rows.append(row)
    return rows


def grid(base: Config, args) -> list[dict]:
    """Whole trainer steps for every backbone x worker count x exchange."""
    from amfs_dist.train import Trainer, on_ray_train

    rows = []
    workers = _ints(args.grid_workers)
    _ensure_ray(args.cpus_per_worker * max(workers))
    for backbone in [b for b in args.grid_backbones.split(",") if b]:
        for w in workers:
            for name in [e for e in args.grid_exchanges.split(",") if e]:
                over = {"model.backbone": backbone, "model.width": args.grid_width,
                        "dist.workers": w, "dist.cpus_per_worker": args.cpus_per_worker,
                        "train.meta_batch": args.grid_meta_batch, "train.val_every": 0,
                        "data.queries": args.grid_queries, **EXCHANGES[name]}
                if args.sketch_dim:
                    over["dist.sketch_dim"] = args.sketch_dim
                cfg = base.replace(**over)
                with tempfile.TemporaryDirectory() as tmp:
                    if on_ray_train(cfg):
                        trainer, sums = _ray_train_steps(cfg, tmp, args.grid_warmup,
                                                         args.grid_steps)
                        rows.append(_grid_row(name, cfg, trainer, sums, args.grid_steps))
                        continue
                    trainer = Trainer(cfg, tmp)
                    try:
                        for _ in range(args.grid_warmup):
                            trainer.train_step()
                        sums = dict.fromkeys(GRID_KEYS + ("step_s", "exchange_bytes",
                                                          "worker_bytes"), 0.0)
                        for _ in range(args.grid_steps):
                            res = trainer.train_step()
                            for k in sums:
                                sums[k] += res.timings.get(k, 0.0)
                    finally:
                        trainer.close()
                rows.append(_grid_row(name, cfg, trainer, sums, args.grid_steps))
    return rows


def _ray_train_steps(cfg: Config, tmp: str, warmup: int, steps: int):
    """dist.exchange=collective: a whole fit on Ray Train (its ranks run the steps); the
    timings of the steps after the warm-up, from rank 0's metrics rows."""
    from pathlib import Path

    from amfs_dist.runs import read_metrics
    from amfs_dist.train import Trainer
    total = warmup + steps
    cfg = cfg.replace(**{"train.steps": total, "train.checkpoint_every": total,
                         "eval.episodes": 1})
    trainer = Trainer(cfg, tmp)
    try:
        trainer.fit(progress=False)
    finally:
        trainer.close()
    sums = dict.fromkeys(GRID_KEYS + ("step_s", "exchange_bytes", "worker_bytes"), 0.0)
    for row in read_metrics(Path(tmp) / "metrics.jsonl")[warmup:]:
        for k in sums:
            sums[k] += row.get(k) or 0.0
    return trainer, sums


def _grid_row(name: str, cfg: Config, trainer, sums: dict, n: int) -> dict:
    return {"bench": "distributed", "part": "grid", "exchange": name,
            "backbone": cfg.backbone, "params": trainer.learner.layout.size,
            "workers": cfg.dist.workers, "meta_batch": cfg.train.meta_batch,
            "queries": cfg.data.queries, "steps": n,
            "sketch_dim": cfg.dist.sketch_dim if "sketch" in name else None,
            "tasks_per_s": round(cfg.train.meta_batch * n / sums["step_s"], 3),
            "driver_bytes": int(sums["exchange_bytes"] // n),
            "worker_bytes": int(sums["worker_bytes"] // n),
            **{k: round(sums[k] / n, 4) for k in ("step_s",) + GRID_KEYS}}


def deterministic(base: Config, steps: int, threads: int) -> dict:
    """train.deterministic=false vs true in process, step by step in turn."""
    from amfs_dist.train import Trainer

    trainers, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for flag in (False, True):
            trainers[flag] = Trainer(base.replace(**{"train.deterministic": flag,
                                                     "dist.workers": 0}), f"{tmp}/{flag}")
            walls[flag] = 0.0
        for i in range(steps + 1):  # the first round warms up
            for flag, trainer in trainers.items():
                torch.use_deterministic_algorithms(flag)
                torch.set_num_threads(1 if flag else threads)
                t0 = time.perf_counter()
                trainer.train_step()
                walls[flag] += (time.perf_counter() - t0) if i else 0.0
        torch.use_deterministic_algorithms(False)
        for trainer in trainers.values():
            trainer.close()
    T = base.train.meta_batch
    rate = {flag: T * steps / walls[flag] for flag in walls}
    return {"bench": "distributed", "part": "deterministic", "backbone": base.backbone,
            "meta_batch": T, "steps": steps, "threads": threads,
            "tasks_per_s": round(rate[False], 3), "deterministic_tasks_per_s": round(rate[True], 3),
            "ratio": round(rate[True] / rate[False], 4)}


def run(args) -> int:
    base = load_config(args.config, args.overrides)
    info = machine()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(args.cpus_per_worker)))  # W=0 computes like one worker
    try:
        rows = scaling(base, sorted(_ints(args.workers)), _ints(args.meta_batches), args.steps,
                       args.warmup, args.cpus_per_worker)
    finally:
        torch.set_num_threads(threads)
    baseline = {r["meta_batch"]: r["step_s"] for r in rows if r["workers"] == 0}
    for row in rows:
        if row["workers"] and row["meta_batch"] in baseline:
            row["overhead_vs_in_process"] = round(row["step_s"] / baseline[row["meta_batch"]] - 1, 4)
        emit({**row, **info, "load_avg_1m": round(os.getloadavg()[0], 2)})
    if args.exchange_workers:
        for row in exchange(base, args):
            emit({**row, **info, "load_avg_1m": round(os.getloadavg()[0], 2)})
    if args.deterministic_steps:
        saved = torch.get_num_threads()
        row = deterministic(base, args.deterministic_steps, max(1, int(args.cpus_per_worker)))
        torch.set_num_threads(saved)
        emit({**row, **info, "load_avg_1m": round(os.getloadavg()[0], 2)})
    if _ints(args.grid_workers):
        for row in grid(base, args):
            emit({**row, **info, "load_avg_1m": round(os.getloadavg()[0], 2)})
    return 0
