"""`amfs bench NAME`: performance figures as JSON lines."""
from __future__ import annotations

import importlib

BENCHMARKS = ["adapt", "train", "data", "distributed"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="performance benchmarks (JSON lines)")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"amfs_dist.benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"amfs_dist.benchmarks.{name}":
                raise
            continue
        module.register(bench_sub)
