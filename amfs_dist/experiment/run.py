"""Running an experiment: its directory, one Ray task per cell, resuming.

Layout of --out:  experiment.json (the manifest: name, resolved spec, cells), cells/NAME/ (an
ordinary run directory plus cell.json: peak memory and the extra evaluations), then the
results report.py writes. A cell is done when its cell.json exists; one with a checkpoint
but no result.json resumes from it; so rerunning the command trains nothing already finished.

Each cell is a Ray task in a placement group of its own: the driver's bundle, then one per
dist.workers, which the cell's RayBackend actors are captured into, as in a Tune trial.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from amfs_dist.errors import RunStopped, UserError
from amfs_dist.experiment.spec import Cell, ExperimentSpec
from amfs_dist.files import read_json, write_json
from amfs_dist.stopping import as_stop

MANIFEST = "experiment.json"
CELLS = "cells"
CELL_FILE = "cell.json"
CANCEL_WAIT_S = 20  # for stopped cells to checkpoint: within Kubernetes' and Slurm's 30 s grace


class ExperimentFailed(UserError):
    """Some cells failed; the others' results are written and a rerun retries the failed."""

    exit_code = 1


# -- one cell (runs in a Ray worker) -------------------------------------------------------------
def eval_overrides(spec: ExperimentSpec, cell: Cell) -> dict[str, list[str]]:
    """The cell's extra test evaluations: name -> key=value overrides for eval_run."""
    from amfs_dist.algorithms.heads import HEADS
    from amfs_dist.config import resolve
    evals = {}
    if HEADS[resolve({}, cell.values).inner_loop].test_time_steps:
        evals.update({f"test_steps={k}": [f"maml.test_steps={k}"] for k in spec.test_steps})
    for name, changes in spec.cross_domain.items():
        evals[f"target={name}"] = [f"{k}={json.dumps(v)}" for k, v in changes.items()]
    return evals


def run_cell(cell_dir: str, values: dict, evals: dict[str, list[str]]) -> dict:
    """Train (or resume, or skip when finished) one cell, run its extra evaluations, write
    cell.json; returns it."""
    from amfs_dist import lifecycle
    from amfs_dist.config import resolve
    from amfs_dist.evaluate import eval_run

    reset_peak_rss()
    run = Path(cell_dir)
    info_path = run / CELL_FILE
    info = read_json(info_path, "cell record") if info_path.is_file() else {}
    trained = not (run / "result.json").is_file()
    if trained:  # start, or continue from the checkpoint a stopped cell left
        lifecycle.train(resolve({}, values), run, progress=False, start_or_continue=True)
    done = info.get("evals", {})
    for name, overrides in evals.items():
        if name not in done:
            done[name] = eval_run(run, overrides=overrides)
    peak_mb = peak_rss_mb()
    if not trained and "peak_rss_mb" in info:  # only evaluated now: training's peak stands
        peak_mb = max(peak_mb, info["peak_rss_mb"])
    info = {"peak_rss_mb": round(peak_mb, 1), "trained_here": trained, "evals": done}
    write_json(info_path, info)
    return info


def reset_peak_rss() -> None:
    """Start the process's peak-RSS count afresh (Linux), so that a Ray worker reused from an
    earlier cell reports this cell's peak; elsewhere the peak is the worker's whole life's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- the directory -------------------------------------------------------------------------------
def prepare_dir(spec: ExperimentSpec, out: Path, cells: list[Cell]) -> None:
    """Create --out, or check that it is this experiment's; nothing of the user's is touched."""
    from amfs_dist.config import load_config

    manifest = out / MANIFEST
    if manifest.is_file():
        old = read_json(manifest, "experiment manifest")
        if old.get("experiment") != spec.name:
            raise UserError(f"--out {out}: holds the experiment {old.get('experiment')!r}, not "
                            f"{spec.name!r}; choose another --out")
        for cell in cells:  # a cell dir trained with other settings must not be reused
            saved = out / CELLS / cell.name / "config.yaml"
            if saved.is_file() and load_config(saved).to_flat() != cell.values:
                differ = sorted(k for k, v in load_config(saved).to_flat().items()
                                if cell.values.get(k) != v)
                raise UserError(f"--out {out}: cell {cell.name} was run with other settings "
                                f"({', '.join(differ[:3])}); use another --out for a changed "
                                f"experiment")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an experiment directory (no {MANIFEST});"
                        f" choose a new or empty directory")
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    known = read_json(manifest, "experiment manifest")["cells"] if manifest.is_file() else {}
    known.update({c.name: c.settings for c in cells})  # cells of earlier runs stay listed
    write_json(manifest, {"amfs_experiment": 1, "experiment": spec.name,
                          "spec": spec.to_dict(), "source": spec.source, "cells": known})


def cell_done(out: Path, cell: Cell, evals: dict) -> bool:
    info = out / CELLS / cell.name / CELL_FILE
    return info.is_file() and set(evals) <= set(read_json(info, "cell record")["evals"])


# -- the experiment ------------------------------------------------------------------------------
def run_experiment(spec: ExperimentSpec, out: str | Path, progress: bool = True) -> dict:
    """Run every unfinished cell on Ray, then write the results; returns the summary."""
    from amfs_dist.distributed.cluster import check_reachable
    from amfs_dist.experiment.report import write_results

    out = Path(out).resolve()
    cells = spec.cells()
    check_reachable()  # a RAY_ADDRESS where no cluster answers: before --out is written
    prepare_dir(spec, out, cells)
    todo = [c for c in cells if not cell_done(out, c, eval_overrides(spec, c))]
    t0 = time.perf_counter()
    failed = _run_on_ray(spec, out, todo, len(cells), progress) if todo else {}
    summary = write_results(spec, out, cells)
    summary.update(cells=len(cells), ran=len(todo), failed=len(failed),
                   wall_s=round(time.perf_counter() - t0, 1))
    summary["line"] = (f"experiment {spec.name}: {len(cells) - len(failed)}/{len(cells)} cells "
                       f"done ({len(todo) - len(failed)} run now); results in {out}")
    if failed:
        name, err = next(iter(failed.items()))
        raise ExperimentFailed(f"{len(failed)} of {len(cells)} cells failed (first: {name}: "
                               f"{err}); the others' results are in {out}; rerun the same "
                               f"command to retry them")
    return summary


def _run_on_ray(spec: ExperimentSpec, out: Path, todo: list[Cell], total: int,
                progress: bool) -> dict[str, str]:
    from amfs_dist.distributed.cluster import ray_for_tasks

    # a cell the cluster can never hold would wait for ever: ray_for_tasks says so first
    requests = [(spec.bundles(cell.values), f"cell {cell.name} (resources: cpus={spec.cpus:g}, "
                 f"gpus={spec.gpus:g}; dist.workers={cell.values['dist.workers']})")
                for cell in todo]
    with ray_for_tasks(requests):
        return _run_cells(spec, out, todo, total, progress)


def _run_cells(spec: ExperimentSpec, out: Path, todo: list[Cell], total: int,
               progress: bool) -> dict[str, str]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from tqdm.auto import tqdm

    task = ray.remote(max_retries=0)(run_cell)
    pending, groups, failed = {}, {}, {}
    bar = tqdm(total=total, initial=total - len(todo), desc=f"experiment {spec.name}",
               unit="cell", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for cell in todo:
            bundles = spec.bundles(cell.values)
            pg = placement_group(bundles, strategy="PACK")
            strategy = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            ref = task.options(num_cpus=bundles[0]["CPU"], num_gpus=bundles[0].get("GPU", 0),
                               scheduling_strategy=strategy, name=f"cell:{cell.name}").remote(
                str(out / CELLS / cell.name), cell.values, eval_overrides(spec, cell))
            pending[ref], groups[ref] = cell, pg
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # Ctrl+C reaches us
            if not done:
                continue
            ref = done[0]
            cell = pending.pop(ref)
            remove_placement_group(groups.pop(ref))
            try:
                ray.get(ref)
            except Exception as e:  # one cell's failure does not stop the others
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                failed[cell.name] = lines[-1][:300] if lines else type(e).__name__
                bar.write(f"cell {cell.name} failed: {failed[cell.name]}")
            bar.update(1)
            bar.set_postfix_str(cell.name)
    except BaseException as e:
        for ref in pending:  # a cancelled cell saves its checkpoint: a rerun resumes it
            ray.cancel(ref)
        # ... once it has written it: Ray ends with this command
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        stop = as_stop(e)
        if stop is not None:
            raise RunStopped(f"experiment stopped by {stop}: {len(pending)} running cell(s) "
                             f"checkpointed, finished cells kept; continue with the same "
                             f"command (--out {out})", stop.signum) from None
        raise
    finally:
        bar.close()
        for pg in groups.values():
            remove_placement_group(pg)
    return failed
