"""`amfs bench adapt`: adaptation + prediction latency of one task, p50 and p99, per head.

Each method in METHODS is trained (train.steps=--train-steps; the latency does not depend on
the learned values) or taken from --run, then, through the Python API as `amfs predict` runs
it, adapted to one test task at a time and asked for its queries' classes:
load(run).adapt(support, labels).predict(queries), timed from the adapt call to the labels.
One JSON line per method and shot count.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from amfs_dist.benchmarks.common import add_config_arguments, emit, machine
from amfs_dist.config import load_config

# one entry per head: a method whose head is new is one more name here
METHODS = ("amfs", "protonet", "r2d2", "metaoptnet", "maml")


def register(sub) -> None:
    p = sub.add_parser("adapt", help="adaptation + prediction latency per task (p50, p99) of "
                                     "each head at 1 and 5 shots")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods (default {','.join(METHODS)})")
    p.add_argument("--shots", default="1,5", help="support images per class (default 1,5)")
    p.add_argument("--tasks", type=int, default=100, help="timed tasks per setting (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed tasks first (default 5)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="meta-training steps of each model trained here (default 0)")
    p.add_argument("--run", action="append", default=[], metavar="METHOD=RUN",
                   help="time this finished run for METHOD instead of training one")
    add_config_arguments(p)
    p.set_defaults(func=run)


def percentile(values: list[float], q: float) -> float:
    import numpy as np
    return float(np.percentile(values, q))


def task_latencies_ms(model, source, tasks: int, warmup: int) -> list[float]:
    """Milliseconds from adapt() to predict()'s labels, for each of `tasks` test tasks."""
    times = []
    for task in range(warmup + tasks):
        ep = source.sample("test", 0, [task])
        t0 = time.perf_counter()
        model.adapt(ep.xs[0], ep.ys[0]).predict(ep.xq[0])
        if task >= warmup:
            times.append(1000.0 * (time.perf_counter() - t0))
    return times


def run(args) -> int:
    from amfs_dist.api import load, train_run
    from amfs_dist.data import make_task_source
    from amfs_dist.errors import UserError

    methods = [m for m in args.methods.split(",") if m]
    given = dict(item.split("=", 1) for item in args.run if "=" in item)
    if len(given) != len(args.run) or set(given) - set(methods):
        raise UserError(f"--run: expected METHOD=RUN for methods of --methods, got {args.run}")
    shots = [int(s) for s in args.shots.split(",") if s]
    if args.tasks < 1 or args.warmup < 0 or not shots or min(shots) < 1:
        raise UserError("--tasks >= 1, --warmup >= 0 and --shots >= 1 required")
    base = load_config(args.config, args.overrides).replace(**{
        "train.steps": args.train_steps, "train.val_every": 0, "eval.episodes": 1,
        "train.device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = given.get(method) or train_run(base.replace(method=method),
                                                  out=Path(tmp) / method).path
            model = load(path)
            for k in shots:
                cfg = model.cfg.replace(**{"data.shots": k, "data.queries": base.eval.queries})
                source = make_task_source(cfg, model.input_shape, training=False)
                ms = task_latencies_ms(model, source, args.tasks, args.warmup)
                emit({"bench": "adapt", "method": method, "ways": cfg.data.ways, "shots": k,
                      "queries_per_task": cfg.data.ways * cfg.data.queries,
                      "p50_ms": round(percentile(ms, 50), 3),
                      "p99_ms": round(percentile(ms, 99), 3),
                      "mean_ms": round(sum(ms) / len(ms), 3), "tasks": args.tasks,
                      "backbone": cfg.backbone, "width": cfg.model.width,
                      "input_shape": list(model.input_shape),
                      "maml_test_steps": cfg.maml.test_steps if model.cfg.inner_loop in (
                          "maml", "fomaml") else None,
                      "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                      **machine()})
    return 0
