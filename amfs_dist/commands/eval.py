"""`amfs eval RUN_DIR [--episodes N] [key=value ...]`: one JSON object on stdout."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on test episodes",
                       description="Evaluate a finished run; key=value may point it at another "
                                   "data set (cross-domain), e.g. data.source=STORE.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--episodes", type=int, help="test episodes (default: eval.episodes)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from amfs_dist.errors import UserError
    from amfs_dist.evaluate import eval_run

    if args.episodes is not None and args.episodes < 1:
        raise UserError(f"--episodes: must be >= 1, got {args.episodes}")
    if args.episodes is not None:
        from amfs_dist.data import check_episode_count
        check_episode_count("--episodes", args.episodes)
    print(json.dumps(eval_run(args.run_dir, args.episodes, args.overrides, progress=True)))
    return 0
