"""`amfs train [--config FILE] [--out DIR [--resume-if-exists]] [--resume RUN_DIR]
[--wait-for-lock] [key=value ...]`."""
from __future__ import annotations

import json

from amfs_dist.locks import add_wait_flag


def register(sub) -> None:
    p = sub.add_parser("train", help="meta-train, then evaluate on the test split",
                       description="Meta-train and evaluate; with no arguments, AMFS on the "
                                   "embedded synthetic glyphs, in-process.")
    p.add_argument("--config", help="YAML config file (keys as in `key=value`)")
    p.add_argument("--out", help="run directory or s3:// / gs:// URI (default "
                                 "runs/METHOD-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="with --out: continue the run in --out if there is one (the same config "
                        "required; a finished run's result is printed again), else start it. "
                        "For launchers that may run the same command twice (requeue, retry)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_wait_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


def run(args) -> int:
    from amfs_dist import api, lifecycle
    from amfs_dist.config import load_config
    from amfs_dist.errors import UserError

    if args.resume and (args.config or args.out):
        raise UserError("--resume takes the run's own config.yaml and directory; "
                        "drop --config/--out (key=value overrides are allowed)")
    if args.resume_if_exists and not args.out:
        raise UserError("--resume-if-exists needs --out (the run to start or continue)")
    progress, wait = not args.no_progress, args.wait_for_lock
    if args.resume:
        result = lifecycle.resume(args.resume, args.overrides, wait_for_lock=wait,
                                  progress=progress)
    else:
        result = api.train_run(load_config(args.config, args.overrides), args.out,
                               resume_if_exists=args.resume_if_exists, wait_for_lock=wait,
                               progress=progress).result
    print(json.dumps(result))
    return 0
