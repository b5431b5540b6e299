"""`amfs tune [--config SWEEP.yaml] [--out DIR [--resume-if-exists --allow-pickle]]
[--resume DIR] [key=value ...]`.

key=value: `sweep.NAME=V` sets a sweep setting, `search.KEY=V` a search dimension, any other
key the base training config (a swept key given this way is fixed: it leaves the search).
The sweep file format is documented in tuning/README.md and amfs_dist/tune/space.py; the sweeps
shipped with the package (amfs_dist/tuning/NAME.yaml) are named by NAME.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from amfs_dist.locks import add_wait_flag, hold


def register(sub) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune + Optuna sweep (kernel bandwidth, lambda, mu, gamma, ...)",
        description="Run a Ray Tune sweep (Optuna TPE search, ASHA early stopping) over config "
                    "keys; writes a trial table, the best config as YAML, a plot and the best "
                    "model's test result into --out. With no --config, the shipped tiny-cpu sweep on "
                    "the synthetic glyphs. Connects to RAY_ADDRESS's cluster if set, else starts a "
                    "local one.")
    p.add_argument("--config", metavar="SWEEP_YAML",
                   help="sweep file: base (config), search (space), sweep (settings); a path, "
                        "or a shipped sweep's name (tiny-cpu, omniglot-gpu, mini-imagenet-gpu)")
    p.add_argument("--out", help="sweep directory or s3:// / gs:// URI (default "
                                 "sweeps/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue an interrupted sweep in DIR (its own sweep.yaml)")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="with --out: continue the sweep in --out if there is one (the same sweep "
                        "required; with --allow-pickle), else start it. For launchers that may "
                        "run the same command twice (Slurm requeue, resubmit)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="with --resume or --resume-if-exists: load Ray Tune's saved state, "
                        "which is a pickle (it can run code when loaded): only for sweep "
                        "directories you trust")
    p.add_argument("--restart-errored", action="store_true",
                   help="with --resume: rerun errored trials from scratch instead of from "
                        "their latest checkpoints")
    p.add_argument("--quiet", action="store_true", help="no live trial table")
    add_wait_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="sweep.NAME=V, search.KEY=V, or a base config key")
    p.set_defaults(func=run)


def run(args) -> int:
    from amfs_dist.errors import UserError
    from amfs_dist.tune.space import load_sweep

    if args.resume:
        if args.config or args.out or args.overrides:
            raise UserError("--resume continues the sweep as it was configured (DIR/sweep.yaml); "
                            "drop --config, --out and key=value")
        from amfs_dist.tune.sweep import print_summary, resume_sweep
        with _owned(args.resume, args.wait_for_lock):
            summary = resume_sweep(args.resume, progress=not args.quiet,
                                   restart_errored=args.restart_errored,
                                   allow_pickle=args.allow_pickle)
        print_summary(summary)
        return 0 if "best_trial" in summary else 1
    if args.restart_errored:
        raise UserError("--restart-errored goes with --resume")
    if args.resume_if_exists and not args.out:
        raise UserError("--resume-if-exists needs --out (the sweep to start or continue)")
    if args.allow_pickle and not args.resume_if_exists:
        raise UserError("--allow-pickle goes with --resume or --resume-if-exists")
    spec = load_sweep(args.config, args.overrides)  # every error here comes before Ray starts
    out = args.out or (
        Path("sweeps") / f"{spec.settings.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    from amfs_dist.tune.sweep import print_summary, run_sweep, start_or_resume_sweep
    with _owned(out, args.wait_for_lock):
        if args.resume_if_exists:
            summary = start_or_resume_sweep(spec, out, progress=not args.quiet,
                                            allow_pickle=args.allow_pickle)
        else:
            summary = run_sweep(spec, out, progress=not args.quiet)
    print_summary(summary)
    return 0 if "best_trial" in summary else 1  # 1: no trial produced a score


def _owned(out, wait: bool):
    """This process's sweep directory (locks.py); a URI has no local folder to lock."""
    from amfs_dist.storage import is_uri
    return contextlib.nullcontext() if is_uri(out) else hold(out, "sweep directory", wait)
