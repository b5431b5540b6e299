"""`amfs bench train`: meta-training tasks/s of every method on the same settings, beside a
plain forward + backward of the same images (compute_over_plain: how far the per-task
meta-gradient pass is from that floor)."""
from __future__ import annotations

import tempfile
import time

from amfs_dist.algorithms.heads import PRESETS
from amfs_dist.backend import resolve_device
from amfs_dist.benchmarks.common import add_config_arguments, emit, machine
from amfs_dist.config import Config, load_config

METHODS = tuple(PRESETS)  # every method


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


def plain_forward_backward_s(cfg: Config, steps: int, warmup: int = 1) -> float:
    """Seconds of one forward + backward of the encoder over a step's images (T x (n_s + n_q)),
    as one ordinary batch: the floor the per-task meta-gradient pass is measured against."""
    import torch

    from amfs_dist.algorithms.learner import MetaLearner
    from amfs_dist.data import make_task_source

    source = make_task_source(cfg)
    learner = MetaLearner(cfg, source.input_shape, resolve_device(cfg))
    ep = source.sample("train", 0, list(range(cfg.train.meta_batch))).to(learner.device)
    images = torch.cat([ep.xs.flatten(0, 1), ep.xq.flatten(0, 1)])
    backbone = learner.module["backbone"]
    autocast = learner.autocast_context()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(learner.device)
            t0 = time.perf_counter()
        with autocast:
            backbone(images, None).float().square().mean().backward()
    _sync(learner.device)
    return (time.perf_counter() - t0) / steps


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-training tasks/s per method (in-process)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (default 5)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    base = load_config(args.config, args.overrides)
    plain_s = plain_forward_backward_s(base, args.steps)
    emit({"bench": "train", "method": "plain-forward-backward", "backbone": base.backbone,
          "images_per_step": base.train.meta_batch * base.data.ways * (base.data.shots + base.data.queries),
          "step_s": round(plain_s, 5), **machine()})
    for method in args.methods.split(","):
        cfg = base.replace(method=method)
        stats = tasks_per_second(cfg, args.steps)
        emit({"bench": "train", "method": method, "backbone": cfg.backbone,
              "ways": cfg.data.ways, "shots": cfg.data.shots, "queries": cfg.data.queries,
              "meta_batch": cfg.train.meta_batch, "maml_steps": cfg.maml.steps,
              "steps": args.steps, **{k: round(v, 5) for k, v in stats.items()},
              "compute_over_plain": round(stats["compute_s"] / plain_s, 3), **machine()})
    return 0
