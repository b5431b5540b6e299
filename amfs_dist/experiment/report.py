"""An experiment's results, written into its directory:

cells.csv              every finished cell and evaluation: settings, test accuracy and its
                       per-run 95% CI, adaptation ms/task, meta-training tasks/s, peak memory,
                       final validation accuracy, mean O-AMFS weight of corrupted / clean tasks
results.csv/.md        one row per condition (a cell's settings but the seed) and evaluation:
                       mean test accuracy over seeds with its 95% CI across seeds (Student t,
                       n-1 degrees of freedom), the mean per-run CI and the cost columns; the
                       markdown also lists every cell
val_accuracy.png       validation accuracy against meta-step, one line per condition
weights.png            O-AMFS weight entropy and smallest agreement over training
accuracy_vs_steps.png  (test_steps) test accuracy and adaptation time against test-time inner
                       steps, the kernel methods' single solve as horizontal lines
stability.png          (a data.conflict_fraction grid) final accuracy against the conflict
                       fraction per weighting, every seed shown
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from amfs_dist.experiment.spec import Cell, ExperimentSpec
from amfs_dist.runs import read_metrics

CELLS_DIR = "cells"
TEST = "test"


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def t_ci95(xs: list[float]) -> float | None:
    """Half-width of the 95% CI of the mean across seeds: t_{0.975, n-1} * sd / sqrt(n)."""
    from scipy.stats import t
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def cell_metrics(run: Path) -> list[dict]:
    """A cell's metrics rows ([] before its first step); a failed cell's torn last line is
    dropped (runs.read_metrics)."""
    path = run / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _tasks_per_s(rows: list[dict], meta_batch: int) -> float | None:
    times = [r["step_s"] for r in rows if isinstance(r.get("step_s"), (int, float))]
    return meta_batch * len(times) / sum(times) if times and sum(times) > 0 else None


def cell_rows(out: Path, cell: Cell) -> list[dict]:
    """The cell's table rows: its test evaluation, then each extra one; [] if unfinished."""
    run = out / CELLS_DIR / cell.name
    if not (run / "result.json").is_file() or not (run / "cell.json").is_file():
        return []
    result = json.loads((run / "result.json").read_text())
    info = json.loads((run / "cell.json").read_text())
    metrics = cell_metrics(run)
    vals = [r["val_accuracy"] for r in metrics if r.get("val_accuracy") is not None]
    common = {"cell": cell.name, **{k: v for k, v in cell.settings.items()},
              "method": result["method"], "data": Path(str(result["data_source"])).name,
              "ways": result["ways"], "shots": result["shots"],
              "tasks_per_s": _tasks_per_s(metrics, cell.values["train.meta_batch"]),
              "peak_rss_mb": info.get("peak_rss_mb"), "meta_steps": result["meta_steps"],
              "final_val_accuracy": vals[-1] if vals else None,
              "weight_corrupted": _mean(r.get("weight_corrupted") for r in metrics),
              "weight_clean": _mean(r.get("weight_clean") for r in metrics)}
    rows = [{**common, "eval": TEST, "test_accuracy": result["test_accuracy"],
             "test_ci95": result["test_ci95"], "adapt_ms_per_task": result["adapt_ms_per_task"]}]
    for name, ev in info.get("evals", {}).items():
        rows.append({**common, "eval": name, "test_accuracy": ev["test_accuracy"],
                     "test_ci95": ev["test_ci95"], "adapt_ms_per_task": ev["adapt_ms_per_task"]})
    return rows


def condition_keys(spec: ExperimentSpec) -> list[str]:
    """The columns that name a condition: method, data, ways, shots, then the other settings."""
    extra = (["variant"] if spec.variants else []) + [
        k for k in spec.grid if k not in ("method", "data.source", "data.ways", "data.shots")]
    return ["method", "data", "ways", "shots"] + extra + ["eval"]


def aggregate(spec: ExperimentSpec, rows: list[dict]) -> list[dict]:
    keys = condition_keys(spec)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys)].append(r)
    table = []
    for key, rs in groups.items():
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        table.append({**dict(zip(keys, key)), "seeds": len(rs), "acc_mean": _mean(accs),
                      "acc_ci95_seeds": t_ci95(accs), "run_ci95_mean": _mean(r["test_ci95"] for r in rs),
                      **{c: _mean(r[c] for r in rs) for c in (
                          "adapt_ms_per_task", "tasks_per_s", "peak_rss_mb", "final_val_accuracy",
                          "weight_corrupted", "weight_clean")}})
    return table


# -- files ---------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if pct else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
    return str(v)


def markdown_table(spec: ExperimentSpec, table: list[dict]) -> str:
    keys = condition_keys(spec)
    head = keys + ["seeds", "test acc % (95% CI over seeds)", "per-run CI %", "adapt ms/task",
                   "train tasks/s", "peak MB"]
    weights = any(r["weight_corrupted"] is not None for r in table)
    if weights:
        head += ["weight corrupted", "weight clean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        acc = _fmt(r["acc_mean"], True)
        if r["acc_ci95_seeds"] is not None:
            acc += f" ± {_fmt(r['acc_ci95_seeds'], True)}"
        cells = [_fmt(r[k]) for k in keys] + [
            str(r["seeds"]), acc, "± " + _fmt(r["run_ci95_mean"], True),
            _fmt(r["adapt_ms_per_task"]), _fmt(r["tasks_per_s"]), _fmt(r["peak_rss_mb"])]
        if weights:
            cells += [_fmt(r["weight_corrupted"]), _fmt(r["weight_clean"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(spec: ExperimentSpec, out: Path, cells: list[Cell]) -> dict:
    rows = [r for c in cells for r in cell_rows(out, c)]
    table = aggregate(spec, rows)
    if rows:
        _write_csv(out / "cells.csv", rows)
        _write_csv(out / "results.csv", table)
    md = markdown_table(spec, table) if table else "(no finished cells)"
    finished = {r["cell"] for r in rows}
    cell_lines = ["| cell | test acc % | per-run CI % |", "|---|---|---|"] + [
        f"| {r['cell']} | {_fmt(r['test_accuracy'], True)} | ± {_fmt(r['test_ci95'], True)} |"
        for r in rows if r["eval"] == TEST]
    (out / "results.md").write_text(
        f"# experiment {spec.name}\n\n{spec.description.strip()}\n\n"
        f"{len(finished)} of {len(cells)} cells finished. Accuracy: mean over seeds, ± the "
        f"95% CI across seeds (Student t); per-run CI: the mean of each run's 95% CI over its "
        f"test episodes. `eval`: `test` is the cell's own test evaluation, `test_steps=k` the "
        f"same episodes with k MAML steps at test time, `target=NAME` a cross-domain "
        f"evaluation.\n\n{md}\n\n## Cells\n\n" + "\n".join(cell_lines) + "\n")
    plots = write_plots(spec, out, cells, rows, table) if rows else []
    return {"results": str(out / "results.md"), "table": md, "plots": plots}


# -- plots ---------------------------------------------------------------------------------------
def _label(spec: ExperimentSpec, settings: dict, skip=("seed",)) -> str:
    return " ".join(str(Path(str(v)).name if k == "data.source" else v)
                    for k, v in settings.items() if k not in skip) or spec.name


def _curves(spec, out: Path, cells: list[Cell], field: str) -> dict[str, dict[int, list]]:
    """condition label -> step -> values of `field` over seeds."""
    curves: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        for r in cell_metrics(out / CELLS_DIR / c.name):
            if isinstance(r.get(field), (int, float)):
                curves[_label(spec, c.settings)][r["step"]].append(r[field])
    return curves


def _plot_curves(ax, curves, ylabel: str) -> None:
    for label, by_step in sorted(curves.items()):
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=label,
                marker="o" if len(steps) < 12 else None)
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def write_plots(spec, out: Path, cells: list[Cell], rows: list[dict], table: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cells if (out / CELLS_DIR / c.name / "cell.json").is_file()]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(name)

    curves = _curves(spec, out, done, "val_accuracy")
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _plot_curves(ax, curves, "validation accuracy")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"{spec.name}: validation accuracy (mean over seeds)")
        save(fig, "val_accuracy.png")

    from amfs_dist.config import resolve
    cosine = [c for c in done if resolve({}, c.values).outer_weighting == "cosine"]
    entropy = _curves(spec, out, cosine, "weight_entropy")
    if entropy:
        agreement = _curves(spec, out, cosine, "agreement_min")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        _plot_curves(axes[0], entropy, "O-AMFS weight entropy")
        _plot_curves(axes[1], agreement, "smallest agreement a_i")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"{spec.name}: cosine weighting over training (mean over seeds)")
        save(fig, "weights.png")

    steps_rows = [r for r in table if r["eval"].startswith("test_steps=")]
    if steps_rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        lines = defaultdict(list)
        for r in steps_rows:
            lines[(r["method"], r["shots"])].append((int(r["eval"].split("=")[1]), r))
        for (method, shots), pts in sorted(lines.items()):
            pts.sort(key=lambda p: p[0])
            ks = [k for k, _ in pts]
            axes[0].plot(ks, [r["acc_mean"] for _, r in pts], marker="o", label=f"{method} {shots}-shot")
            axes[1].plot(ks, [r["adapt_ms_per_task"] for _, r in pts], marker="o",
                         label=f"{method} {shots}-shot")
        solves = [r for r in table if r["eval"] == TEST and not any(r["method"] == m for m, _ in lines)]
        for i, r in enumerate(solves):  # the kernel methods: one solve, a horizontal line each
            for ax, v in zip(axes, (r["acc_mean"], r["adapt_ms_per_task"])):
                ax.axhline(v, linestyle="--", color=f"C{len(lines) + i}",
                           label=f"{r['method']} {r['shots']}-shot (one solve)")
        axes[0].set_ylabel("test accuracy")
        axes[1].set_ylabel("adaptation ms per task")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("test-time inner steps")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{spec.name}: MAML steps against one kernel solve")
        save(fig, "accuracy_vs_steps.png")

    if "data.conflict_fraction" in spec.grid:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        by = defaultdict(list)
        for r in rows:
            if r["eval"] == TEST:
                # a variant names its weighting (stability-study), else the grid or the method
                weighting = r.get("variant") or r.get("outer.weighting") or r["method"]
                by[weighting].append((r["data.conflict_fraction"], r["test_accuracy"]))
        for i, (weighting, pts) in enumerate(sorted(by.items())):
            offset = (i - (len(by) - 1) / 2) * 0.012  # side by side, so every seed shows
            ax.scatter([p + offset for p, _ in pts], [a for _, a in pts], alpha=0.6, s=18,
                       label=f"{weighting} (each seed)")
            ps = sorted({p for p, _ in pts})
            ax.plot([p + offset for p in ps],
                    [_mean(a for q, a in pts if q == p) for p in ps], marker="s")
        ax.set_xlabel("conflict fraction p")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{spec.name}: outer weightings under conflicting tasks")
        save(fig, "stability.png")
    return written
