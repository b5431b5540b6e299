"""Run directories: the marker that makes one ours, and checked reading of the files in it.

Every file a run directory holds may be damaged (a crash mid-write), foreign (someone else's
file of the same name) or hostile (a crafted pickle): each is read here, and a bad one is one
UserError naming the file, never a traceback.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from amfs_dist import __version__
from amfs_dist.errors import UserError
from amfs_dist.files import read_json, shorten, write_json

MARKER = "amfs-run.json"  # written when a run directory is made: `--out` may reuse only these
CONFIG = "config.yaml"
RESULT = "result.json"
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"


def is_run_dir(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("package") == "amfs-dist"
    except (OSError, ValueError, AttributeError):
        return False


def check_run_version(run_dir: Path) -> None:
    """A run written by a newer amfs may hold what this one cannot read: refused, naming both."""
    if not (run_dir / MARKER).is_file():
        return
    marker = read_json(run_dir / MARKER, "run marker")
    written = marker.get("version") if isinstance(marker, dict) else None
    if not isinstance(written, str) or marker.get("package") != "amfs-dist":
        raise UserError(f"{run_dir / MARKER}: not an amfs run marker; repair or remove it")
    try:
        newer = Version(written) > Version(__version__)
    except InvalidVersion:
        raise UserError(f"{run_dir / MARKER}: unreadable amfs version {shorten(written, 40)!r}"
                        ) from None
    if newer:
        raise UserError(f"{run_dir}: written by amfs {written}, newer than this amfs "
                        f"{__version__}; use amfs {written} or later for it")


def check_new_run_dir(run_dir: Path) -> None:
    """`--out` may be new, empty, or a run directory of ours that has neither a checkpoint nor
    a result yet (one whose first steps failed)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: exists and is not a directory")
    if (run_dir / RESULT).exists() or (run_dir / MODEL).exists():
        raise UserError(f"--out {run_dir}: holds a finished run; evaluate it with "
                        f"`amfs eval {run_dir}`, extend it with `amfs train --resume {run_dir} "
                        f"train.steps=N`, or choose another --out")
    if (run_dir / CHECKPOINT).exists():
        raise UserError(f"--out {run_dir}: holds a run already; resume it with "
                        f"`amfs train --resume {run_dir}` or choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise UserError(f"--out {run_dir}: a non-empty directory that is not an amfs run "
                        f"(no {MARKER}); nothing written, choose an empty or new directory")


def make_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / MARKER, {"package": "amfs-dist", "version": __version__}, indent=None)


def read_run_config(run_dir: Path, overrides: list[str] | None = None, flag: str = "--resume",
                    name: str | None = None):
    """The run's config.yaml with `overrides`; an empty (torn) one is refused, not defaulted.
    Errors name the run as `flag name` (name: the run directory, or its URI)."""
    from amfs_dist.config import load_config
    path = run_dir / CONFIG
    if not path.is_file():
        raise UserError(f"{flag} {name or run_dir}".strip() + f": not a run directory "
                        f"(no {CONFIG})")
    if not path.read_bytes().strip():
        raise UserError(f"{path}: empty; the run's settings are lost (repair it from a copy)")
    return load_config(path, overrides)


def read_result(run_dir: Path) -> dict:
    result = read_json(run_dir / RESULT, "result")
    if not isinstance(result, dict):
        raise UserError(f"{run_dir / RESULT}: not an amfs result (not a JSON object)")
    return result


def load_torch_file(path: Path, keys: tuple[str, ...], what: str,
                    map_location: str | torch.device = "cpu") -> dict:
    """A dict saved with torch.save holding `keys`, loaded with weights_only=True."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: never do that
        raise UserError(f"{path}: refused as unsafe: it holds objects other than tensors and "
                        f"plain data, so it was not loaded") from None
    except Exception as e:  # truncated zip, not a zip, not a torch file: all of it is damage
        raise UserError(f"{path}: cannot be read ({type(e).__name__}); damaged or not an "
                        f"amfs {what}") from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing or not isinstance(state["model"], dict):
        raise UserError(f"{path}: not an amfs {what} (no {', '.join(missing) or 'model state'})")
    return state


def state_dict_mismatch(module: nn.Module, state: dict) -> list[str]:
    """The parameters and buffers where `state` and the built module differ (name and shapes)."""
    ours = module.state_dict()
    diffs = [f"{k} missing" for k in ours if k not in state]
    diffs += [f"{k} unexpected" for k in state if k not in ours]
    for k, v in ours.items():
        theirs = state.get(k)
        if theirs is not None and (not isinstance(theirs, torch.Tensor) or theirs.shape != v.shape):
            shape = list(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            diffs.append(f"{k} {shape} in the file, {list(v.shape)} for the config")
    return diffs


def load_module_state(module: nn.Module, state: dict, path: Path, config: str) -> None:
    """Load `state` into the module built from `config`; a mismatch is one line naming both."""
    diffs = state_dict_mismatch(module, state)
    if diffs:
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise UserError(f"{path}: does not match the model of {config}: "
                        f"{'; '.join(diffs[:4])}{more}")
    module.load_state_dict(state)


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a torn last line (a crash mid-write) is dropped."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer step")
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a crash mid-write: the checkpoint has no step past it anyway
            raise UserError(f"{path}: line {i + 1} is not a metrics row; "
                            f"repair or remove it") from None
        rows.append(row)
    return rows
