"""`amfs tune`: Ray Tune + Optuna sweeps (amfs_dist.tune)."""
from __future__ import annotations


def register(sub) -> None:
    try:
        from amfs_dist.tune import cli as tune_cli
    except ImportError:
        return
    tune_cli.register(sub)
