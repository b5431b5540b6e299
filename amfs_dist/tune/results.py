"""A finished sweep's results, written into --out:

trials.parquet / trials.csv / trials.md   every trial: status, reports, steps, final and best
                                          metric, swept values (best trial first)
best.yaml                                 the best trial's full config: `amfs train --config`
best-run/                                 the best trial's run dir (config, checkpoint, model.pt,
                                          metrics.jsonl, result.json): `amfs eval best-run` works
result.json                               the best trial, its score and its test-split result
metric_vs_params.png                      the metric against each swept parameter

The best trial is the one with the best metric at its last report among the trials that ran
all their validations (those ASHA stopped early compete only if none did); its latest Tune
checkpoint, the end of its training, is the model evaluated on the test split.
"""
from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amfs_dist.config import dump_yaml, resolve
from amfs_dist.files import atomic_write, write_json, write_text
from amfs_dist.storage import RemoteRun, is_uri
from amfs_dist.tune.space import SweepSpec

CKPT_FILES = ("checkpoint.pt", "config.yaml", "metrics.jsonl")


@dataclass
class TrialRecord:
    trial: str
    status: str            # completed, stopped (by ASHA), diverged, error, unfinished
    reports: int
    step: int | None
    score: float | None    # the metric at the last report
    best_score: float | None
    params: dict[str, Any]
    config: dict[str, Any]
    checkpoint: str | None = None
    resumed_from: int = 0
    trial_s: float | None = None
    error: str | None = None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _error_line(err) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def collect(grid, spec: SweepSpec) -> list[TrialRecord]:
    """ResultGrid -> one record per trial."""
    records = []
    for r in grid:
        m = dict(r.metrics or {})
        config = dict(m.get("config") or {})
        reports = int(m.get("training_iteration") or 0)
        score = m.get(spec.metric)
        best = None
        df = r.metrics_dataframe
        if df is not None and spec.metric in df:
            col = [v for v in df[spec.metric].tolist() if _finite(v)]
            if col:
                best = max(col) if spec.mode == "max" else min(col)
        if r.error is not None:
            status = "error"
        elif m.get("diverged"):
            status = "diverged"
        elif reports == 0:
            status = "unfinished"
        elif spec.settings.scheduler == "asha" and reports < spec.max_reports:
            status = "stopped"
        else:
            status = "completed"
        records.append(TrialRecord(
            trial=m.get("trial_id") or Path(r.path).name.removeprefix("trial_"),
            status=status, reports=reports, step=m.get("step"),
            score=float(score) if _finite(score) else None,
            best_score=float(best) if best is not None else None,
            params={k: config.get(k) for k in spec.search}, config=config,
            checkpoint=_location(r.checkpoint) if r.checkpoint is not None else None,
            resumed_from=int(m.get("resumed_from") or 0), trial_s=m.get("trial_s"),
            error=_error_line(r.error) if r.error is not None else None))
    return records


def _location(checkpoint) -> str:
    """A Tune checkpoint's local path, or its URI when it is on object storage."""
    kind = checkpoint.filesystem.type_name  # "local", "s3" or "gcs"
    if kind == "local":
        return checkpoint.path
    return f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"


def rank(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best first: trials that ran their whole budget (completed) before those ASHA stopped,
    each group by the metric at its last report; then trials without a score."""
    sign = 1.0 if mode == "max" else -1.0

    def key(r: TrialRecord):
        scored = r.score is not None
        return (scored, scored and r.status == "completed",
                sign * r.score if scored else 0.0, r.reports)
    return sorted(records, key=key, reverse=True)


def table_rows(records: list[TrialRecord], spec: SweepSpec) -> list[dict]:
    rows = []
    for r in records:
        row = {"trial": r.trial, "status": r.status, "reports": r.reports, "step": r.step,
               spec.metric: r.score, f"best_{spec.metric}": r.best_score}
        row.update(r.params)
        row.update({"resumed_from": r.resumed_from,
                    "trial_s": round(r.trial_s, 3) if _finite(r.trial_s) else None,
                    "error": r.error})
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_tables(rows: list[dict], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(rows[0]) if rows else ["trial"]
    # a column of mixed int/float values is stored as float
    cols = {}
    for c in columns:
        vals = [row.get(c) for row in rows]
        if any(isinstance(v, float) for v in vals) and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals):
            vals = [None if v is None else float(v) for v in vals]
        cols[c] = vals
    pq.write_table(pa.table(cols), out / "trials.parquet")
    with atomic_write(out / "trials.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    write_text(out / "trials.md", "\n".join(lines) + "\n")


def write_best_yaml(best: TrialRecord, spec: SweepSpec, path: Path) -> None:
    cfg = resolve(best.config, {})
    header = [f"# best trial {best.trial} of sweep {spec.settings.name!r}: "
              f"{spec.metric}={best.score:.4f} at step {best.step}",
              "# swept: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()),
              "# a full amfs config: amfs train --config THIS_FILE [key=value ...]"]
    write_text(path, "\n".join(header) + "\n" + dump_yaml(cfg.to_dict(), sort_keys=False))


def plot(records: list[TrialRecord], spec: SweepSpec, best: TrialRecord | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.search)
    n = len(keys)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = {"completed": ("tab:blue", "o"), "stopped": ("tab:orange", "v"),
              "diverged": ("tab:red", "x"), "error": ("tab:red", "x"),
              "unfinished": ("tab:gray", ".")}
    for ax, key in zip(axes.flat, keys):
        dist = spec.search[key]
        cats = [repr(c) for c in dist.choices] if dist.kind == "choice" else None
        for status, (color, marker) in styles.items():
            pts = [(r.params.get(key), r.score) for r in records
                   if r.status == status and r.score is not None]
            if not pts:
                continue
            xs = [cats.index(repr(x)) if cats else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], c=color, marker=marker, label=status, alpha=0.8)
        if best is not None and best.score is not None:
            x = best.params.get(key)
            ax.scatter([cats.index(repr(x)) if cats else x], [best.score], s=220,
                       facecolors="none", edgecolors="black", linewidths=1.5, label="best")
        if cats:
            ax.set_xticks(range(len(cats)), cats)
        elif dist.log:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize="small")
    fig.suptitle(f"sweep {spec.settings.name}: {spec.metric} at each trial's last report "
                 f"({len(records)} trials)")
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_trial_run(run_dir: str, episodes: int | None) -> dict:
    """Finish the trial run copied into run_dir as training finishes a run: model.pt from its
    checkpoint's parameters, the test-split evaluation every finished run gets (eval_run, as
    `amfs eval`), written as result.json; returns the result."""
    import torch

    from amfs_dist.evaluate import eval_run
    from amfs_dist.runs import load_torch_file

    t0 = time.perf_counter()
    run = Path(run_dir)
    state = load_torch_file(run / "checkpoint.pt", ("model", "input_shape", "step"), "checkpoint")
    torch.save({"model": state["model"], "input_shape": state["input_shape"]}, run / "model.pt")
    result = {k: v for k, v in eval_run(run, episodes).items() if k != "run"}
    result.update(meta_steps=int(state["step"]), wall_s=round(time.perf_counter() - t0, 3))
    write_json(run / "result.json", result)
    return result


def evaluate_best(best: TrialRecord, spec: SweepSpec, out: Path) -> dict:
    """Copy the best trial's latest checkpoint to out/best-run and test it, on a GPU when the
    trials had one (as a Ray task), else in this process."""
    run = out / "best-run"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    if is_uri(best.checkpoint):  # the sweep's --out is on object storage
        RemoteRun(best.checkpoint, run).pull(CKPT_FILES)
    else:
        for name in CKPT_FILES:
            src = Path(best.checkpoint) / name
            if src.is_file():
                shutil.copy2(src, run / name)
    episodes = spec.settings.test_episodes
    d = spec.base.dist
    gpus = spec.settings.trial_gpus or (d.gpus_per_worker if d.workers else 0)
    if gpus:
        import ray
        task = ray.remote(num_cpus=spec.settings.trial_cpus, num_gpus=min(1.0, float(gpus)))(
            evaluate_trial_run)
        return ray.get(task.remote(str(run), episodes))
    return evaluate_trial_run(str(run), episodes)


def write_results(records: list[TrialRecord], spec: SweepSpec, out: Path, wall_s: float,
                  location: str | None = None) -> dict:
    """Write the results into `out`; `location`: where they end up (an s3:// or gs:// --out
    whose local copy `out` is), as the summary names them."""
    shown = location.rstrip("/") if location else str(out)
    ranked = rank(records, spec.mode)
    write_tables(table_rows(ranked, spec), out)
    candidates = [r for r in ranked if r.score is not None and r.checkpoint and r.status
                  in ("completed", "stopped")]
    best = candidates[0] if candidates else None
    plot(ranked, spec, best, out / "metric_vs_params.png")
    counts = {s: sum(r.status == s for r in records)
              for s in ("completed", "stopped", "diverged", "error", "unfinished")}
    summary = {"sweep": spec.settings.name, "trials": len(records), **counts,
               "metric": spec.metric, "mode": spec.mode, "wall_s": round(wall_s, 1),
               "out": shown}
    if best is None:
        summary["line"] = (f"sweep {spec.settings.name}: no trial produced a {spec.metric} "
                           f"({counts}); see {shown}/trials.md")
        write_json(out / "result.json", summary)
        return summary
    write_best_yaml(best, spec, out / "best.yaml")
    test = evaluate_best(best, spec, out)
    summary.update({"best_trial": best.trial, "best_score": best.score, "best_step": best.step,
                    "best_params": best.params, "best_config": f"{shown}/best.yaml",
                    "best_run": f"{shown}/best-run", "test": test})
    if test.get("test_accuracy") is not None:
        test_txt = f"test_accuracy={test['test_accuracy']:.4f} +- {test['test_ci95']:.4f}"
    else:
        test_txt = f"test_mse={test.get('test_mse', float('nan')):.4f}"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    stopped = f" ({counts['stopped']} stopped early by ASHA)" if spec.settings.scheduler == "asha" else ""
    summary["line"] = (f"best of {len(records)} trials{stopped}: trial {best.trial} "
                       f"{spec.metric}={best.score:.4f} {params}; "
                       f"{test_txt} ({test['test_episodes']} episodes); config: "
                       f"{shown}/best.yaml")
    write_json(out / "result.json", {k: v for k, v in summary.items() if k != "line"},
               default=str)
    return summary
