"""`amfs bench adapt`: test-time adaptation, I-AMFS (one solve) against MAML with 1, 5, 10 steps.

Both models are meta-trained on the same settings (or taken from given run directories) and
evaluated on the same seeded test episodes; the time is adaptation + query prediction per task.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from amfs_dist.benchmarks.common import add_config_arguments, emit, machine
from amfs_dist.config import load_config


def register(sub) -> None:
    p = sub.add_parser("adapt", help="test-time adaptation time and accuracy: I-AMFS vs MAML steps")
    p.add_argument("--train-steps", type=int, default=100,
                   help="meta-training steps of each model when no run is given (default 100)")
    p.add_argument("--episodes", type=int, default=200, help="test episodes (default 200)")
    p.add_argument("--maml-steps", default="1,5,10", help="MAML test-time steps to measure")
    p.add_argument("--amfs-run", help="use this finished AMFS run instead of training one")
    p.add_argument("--maml-run", help="use this finished MAML run instead of training one")
    add_config_arguments(p)
    p.set_defaults(func=run)


def _trained(cfg, run_dir: str | None, tmp: Path, name: str):
    from amfs_dist import lifecycle
    from amfs_dist.evaluate import load_run
    if run_dir is None:
        run_dir = tmp / name
        lifecycle.train(cfg.replace(**{"eval.episodes": 1}), run_dir, progress=False)
    return load_run(run_dir)


def run(args) -> int:
    from amfs_dist.data import make_task_source
    from amfs_dist.evaluate import evaluate_episodes

    base = load_config(args.config, args.overrides)
    base = base.replace(**{"train.steps": args.train_steps, "train.val_every": 0})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = [("amfs", None)] + [("maml", int(s)) for s in args.maml_steps.split(",")]
        trained = {"amfs": _trained(base.replace(method="amfs"), args.amfs_run, tmp, "amfs"),
                   "maml": _trained(base.replace(method="maml"), args.maml_run, tmp, "maml")}
        for method, steps in settings:
            cfg, learner, input_shape = trained[method]
            if steps is not None:
                cfg = cfg.replace(**{"maml.test_steps": steps})
                learner.cfg = cfg
            source = make_task_source(cfg, input_shape)
            # one warm-up batch so that one-off start-up costs are not counted
            evaluate_episodes(learner, source, "test", min(cfg.eval.batch, args.episodes),
                              cfg.eval.queries, cfg.eval.batch)
            stats = evaluate_episodes(learner, source, "test", args.episodes, cfg.eval.queries,
                                      cfg.eval.batch)
            emit({"bench": "adapt", "method": "I-AMFS" if steps is None else "MAML",
                  "inner_steps": steps, "accuracy": round(stats["accuracy"], 4),
                  "ci95": round(stats["ci95"], 4),
                  "adapt_ms_per_task": round(stats["adapt_ms_per_task"], 3),
                  "episodes": args.episodes, "backbone": cfg.backbone, "ways": cfg.data.ways,
                  "shots": cfg.data.shots, "meta_train_steps": args.train_steps, **machine()})
    return 0
