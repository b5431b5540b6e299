"""`amfs train [--config FILE] [--out DIR] [--resume RUN_DIR] [key=value ...]`."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-train, then evaluate on the test split",
                       description="Meta-train and evaluate; with no arguments, AMFS on the "
                                   "embedded synthetic glyphs, in-process.")
    p.add_argument("--config", help="YAML config file (keys as in `key=value`)")
    p.add_argument("--out", help="run directory (default runs/METHOD-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from amfs_dist.config import load_config
    from amfs_dist.errors import UserError
    from amfs_dist.train import run_training

    if args.resume and (args.config or args.out):
        raise UserError("--resume takes the run's own config.yaml and directory; "
                        "drop --config/--out (key=value overrides are allowed)")
    cfg = None if args.resume else load_config(args.config, args.overrides)
    result = run_training(cfg, out=args.out, resume=args.resume, progress=not args.no_progress,
                          overrides=args.overrides if args.resume else None)
    print(json.dumps(result))
    return 0
