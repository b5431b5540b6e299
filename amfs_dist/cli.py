"""The `amfs` command line: train, eval, predict, status, data, tune, experiment, bench.

Each command lives in its own module exposing register(subparsers); the parser it adds sets
func=run, and run(args) returns the exit code. UserError becomes one line on stderr, exit 2;
an OSError that reaches here (a full disk, a permission refused) one line naming the path and
what went wrong, exit 1: the environment's fault, not the input's.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from amfs_dist import stopping
from amfs_dist.errors import RunStopped, UserError
from amfs_dist.files import describe_os_error

COMMAND_MODULES = [
    "amfs_dist.commands.train",
    "amfs_dist.commands.eval",
    "amfs_dist.commands.predict",
    "amfs_dist.commands.status",
    "amfs_dist.data.cli",
    "amfs_dist.tune.cli",
    "amfs_dist.experiment.cli",
    "amfs_dist.benchmarks.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options ("eval RUN --episodes 3 k=v")
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        with stopping.raising():  # TERM and USR1 stop a command as Ctrl-C does
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"amfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except RunStopped as e:
        print(f"amfs: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"amfs: error: {describe_os_error(e)}", file=sys.stderr)
        return 2 if e.errno == errno.ENAMETOOLONG else 1  # a name too long is the input's
    except KeyboardInterrupt as e:
        stop = stopping.as_stop(e)
        if stop is None:
            print("amfs: interrupted", file=sys.stderr)
            return 130
        print(f"amfs: stopped by {stop}", file=sys.stderr)
        return stop.exit_code
