"""Shared pieces of the `amfs bench` commands: JSON-line output and config handling."""
from __future__ import annotations

import json
import platform
import sys

import torch


def emit(record: dict) -> None:
    """One benchmark figure as a JSON line on stdout."""
    print(json.dumps(record), flush=True)


def machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}


def add_config_arguments(p) -> None:
    p.add_argument("--config", help="YAML config the benchmark starts from")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every measured setting")
