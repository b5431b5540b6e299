"""`amfs experiment NAME [--config FILE] [--out DIR] [--seeds N] [key=value ...]`."""
from __future__ import annotations

import time
from pathlib import Path

from amfs_dist.experiment.spec import EXPERIMENTS
from amfs_dist.locks import add_wait_flag, hold


def register(sub) -> None:
    p = sub.add_parser(
        "experiment", help="an experiment of the article: a grid of runs on Ray, table and plots",
        description="Run an experiment's grid of cells (methods x data x ways/shots x seeds) "
                    "concurrently on the Ray cluster at RAY_ADDRESS, else a local one, then write "
                    "results.md, results.csv, cells.csv and PNG plots into --out. Rerunning the "
                    "command trains nothing already finished and resumes interrupted cells.")
    p.add_argument("name", metavar="NAME", choices=EXPERIMENTS, help=", ".join(EXPERIMENTS))
    p.add_argument("--config", metavar="FILE",
                   help="experiment file: a path, or the name of a shipped one (omniglot, "
                        "mini-imagenet, cub, fc100, cifar-fs, smoke; default: NAME's own)")
    p.add_argument("--out", help="experiment directory (default experiments-out/NAME-TIMESTAMP)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the file's seeds)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_wait_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every cell (a grid key given here is fixed)")
    p.set_defaults(func=run)


def run(args) -> int:
    from amfs_dist.experiment.spec import load_experiment

    spec = load_experiment(args.name, args.config, args.overrides, args.seeds)  # before Ray
    out = Path(args.out) if args.out else (
        Path("experiments-out") / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from amfs_dist.experiment.run import run_experiment
    with hold(out, "experiment directory", args.wait_for_lock):
        summary = run_experiment(spec, out, progress=not args.quiet)
    print(summary["table"])
    print(summary["line"], flush=True)
    return 0
