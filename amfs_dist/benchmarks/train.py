"""`amfs bench train`: meta-training tasks/s of amfs, iamfs, maml and fomaml on the same settings."""
from __future__ import annotations

import tempfile
import time

from amfs_dist.benchmarks.common import add_config_arguments, emit, machine
from amfs_dist.config import Config, load_config

METHODS = ("amfs", "iamfs", "maml", "fomaml")


def tasks_per_second(cfg: Config, steps: int, warmup: int = 1) -> dict:
    """In-process meta-training throughput: tasks/s over `steps` steps after `warmup` steps."""
    from amfs_dist.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg.replace(**{"train.val_every": 0}), tmp)
        try:
            for _ in range(warmup):
                trainer.train_step()
            t0 = time.perf_counter()
            timings = {"sampling_s": 0.0, "compute_s": 0.0, "weighting_s": 0.0, "update_s": 0.0}
            for _ in range(steps):
                res = trainer.train_step()
                for k in timings:
                    timings[k] += res.timings.get(k, 0.0)
            wall = time.perf_counter() - t0
        finally:
            trainer.close()
    tasks = steps * cfg.train.meta_batch
    return {"tasks_per_s": tasks / wall, "step_s": wall / steps,
            **{k: v / steps for k, v in timings.items()}}


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-training tasks/s per method (in-process)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (default 5)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    base = load_config(args.config, args.overrides)
    for method in args.methods.split(","):
        cfg = base.replace(method=method)
        stats = tasks_per_second(cfg, args.steps)
        emit({"bench": "train", "method": method, "backbone": cfg.backbone,
              "ways": cfg.data.ways, "shots": cfg.data.shots, "queries": cfg.data.queries,
              "meta_batch": cfg.train.meta_batch, "maml_steps": cfg.maml.steps,
              "steps": args.steps, **{k: round(v, 5) for k, v in stats.items()}, **machine()})
    return 0
