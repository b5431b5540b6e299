"""`amfs experiment`: the experiment file, cells, resume, results; the smoke suite end to end."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from amfs_dist.cli import main
from amfs_dist.config import PACKAGE_DIR, ConfigError
from amfs_dist.errors import UserError
from amfs_dist.experiment.report import t_ci95
from amfs_dist.experiment.run import MANIFEST, prepare_dir, run_cell
from amfs_dist.experiment.spec import EXPERIMENTS, load_experiment

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = PACKAGE_DIR / "experiments"  # the experiment files shipped with the package
SMOKE = SHIPPED / "smoke.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GRID = """
base: {data.ways: 3, model.width: 8, train.steps: 4}
grid: {method: [amfs, maml], data.shots: [1, 2]}
variants: {full: {}, mu0: {kernel.mu: 0.0}}
seeds: 2
resources: {cpus: 1}
"""


def test_grid_cells_are_the_product_named_from_their_settings(tmp_path):
    spec = load_experiment("ablation", write(tmp_path / "e.yaml", GRID))
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 2
    names = {c.name for c in cells}
    assert "mu0-maml-shots2-seed1" in names and "full-amfs-shots1-seed0" in names
    cell = next(c for c in cells if c.name == "mu0-maml-shots2-seed1")
    assert cell.values["kernel.mu"] == 0.0 and cell.values["seed"] == 1
    assert cell.values["data.ways"] == 3 and cell.values["data.shots"] == 2
    assert spec.bundles(cell.values) == [{"CPU": 1.0}]


def test_overrides_fix_a_grid_key_and_seeds_flag_wins(tmp_path):
    spec = load_experiment("compare", write(tmp_path / "e.yaml", GRID),
                           ["data.shots=5", "dist.workers=2"], seeds=1)
    cells = spec.cells()
    assert len(cells) == 2 * 2  # variants x methods, one seed, shots fixed
    assert {c.values["data.shots"] for c in cells} == {5}
    assert spec.bundles(cells[0].values) == [{"CPU": 1.0}] + [{"CPU": 1.0}] * 2


def test_multi_experiment_file_merges_base_per_section(tmp_path):
    path = write(tmp_path / "e.yaml", "base: {data.ways: 3, model.width: 8}\nseeds: 1\n"
                 "experiments:\n  steps:\n    base: {data.ways: 4}\n    grid: {method: [maml]}\n"
                 "    test_steps: [0, 2]\n")
    spec = load_experiment("steps", path)
    (cell,) = spec.cells()
    assert cell.values["data.ways"] == 4 and cell.values["model.width"] == 8
    assert spec.test_steps == [0, 2]
    with pytest.raises(ConfigError, match="has no 'compare'"):
        load_experiment("compare", path)


@pytest.mark.parametrize("text, match", [
    ("grid: {kernel.lamda: [1.0]}", "kernel.lamda: unknown config key"),
    ("grid: {method: []}", "grid.method: expected a non-empty list"),
    ("grid: {method: [nope]}", "method: must be one of"),
    ("seeds: 0", "seeds: must be >= 1, got 0"),
    ("resources: {cpus: 0}", "resources.cpus"),
    ("test_steps: [-1]", "test_steps"),
    ("grids: {}", "grids: unknown key"),
    ("resources: {cpus: 1, gpus: -0.5}", "resources.gpus: must be >= 0"),
    ("resources: {gpus: .nan}", "resources.gpus: expected a finite number"),
    ("resources: {cpus: 1.0e+9}", "resources.cpus: must be > 0, <= 1024"),
    ("resources: {gpus: 1.5}", "resources.gpus: .*whole number above 1"),
    ("resources: {disk: 1}", "resources.disk: unknown key"),
    ("variants: {../up: {}}", "variants.../up: must be a name of letters"),
    ("variants: {/abs/x: {}}", "variants./abs/x: must be a name of letters"),
    ("variants: {full: 3}", "variants.full: expected a mapping"),
    (f"grid: {{data.source: [/a/{'x' * 300}1, /b/{'x' * 300}2]}}", "two cells share a name"),
])
def test_bad_experiment_files_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment("compare", write(tmp_path / "e.yaml", text))


@pytest.mark.parametrize("text, names", [
    ("variants: {../../../ESC/relative: {}}", "variants.../../../ESC"),
    ("variants: {'{tmp}/ESC/absolute': {}}", "variants./"),
    ("variants: {..: {}}", "variants...:"),
    ("resources: {cpus: 1, gpus: -0.5}", "resources.gpus"),
    ("resources: {cpus: .nan}", "resources.cpus"),
])
def test_experiment_file_that_would_escape_out_or_ask_bad_resources_is_refused(
        tmp_path, capsys, monkeypatch, text, names):
    """Refused in one line before anything is written: nothing outside --out, nor inside
    (the absolute variant points into tmp_path, so that even a regression stays there)."""
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    write(work / "escape.yaml", GRID.replace("variants: {full: {}, mu0: {kernel.mu: 0.0}}", "")
          .replace("resources: {cpus: 1}", "") + text.replace("{tmp}", str(tmp_path)) + "\n")
    before = sorted(tmp_path.rglob("*"))
    assert main(["experiment", "compare", "--config", "escape.yaml", "--out", "exp_esc",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amfs: error: ") and err.count("\n") == 1 and names in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_bad_seeds_flag_is_named_as_the_flag(tmp_path, capsys):
    assert main(["experiment", "compare", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "amfs: error: --seeds: must be >= 1, got 0\n"
    assert not (tmp_path / "o").exists()


def test_every_shipped_experiment_file_loads():
    for name in EXPERIMENTS:
        assert load_experiment(name).cells()
        assert load_experiment(name, SMOKE).cells()
    # the O-AMFS study: 6 weightings x 2 conflict kinds x 2 fractions x 5 seeds
    study = load_experiment("stability", "stability-study").cells()
    assert len(study) == 120
    assert len(load_experiment("stability", "stability-study-t32").cells()) == 40
    for preset in ("omniglot", "mini-imagenet", "cub", "fc100", "cifar-fs"):
        path = SHIPPED / f"{preset}.yaml"
        for name in EXPERIMENTS:
            assert load_experiment(name, path).cells()


def test_t_ci95_matches_the_t_table():
    # t_{0.975, 2} = 4.303: three values with sd 1 -> 4.303 / sqrt(3)
    assert t_ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert t_ci95([0.5]) is None


def test_out_dir_of_the_user_is_refused(tmp_path):
    spec = load_experiment("compare", write(tmp_path / "e.yaml", GRID))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an experiment directory"):
        prepare_dir(spec, mine, spec.cells())
    assert (mine / "notes.txt").read_text() == "keep" and not (mine / MANIFEST).exists()
    ours = tmp_path / "ours"
    prepare_dir(spec, ours, spec.cells())
    other = load_experiment("steps", write(tmp_path / "s.yaml", GRID))
    with pytest.raises(UserError, match="holds the experiment 'compare'"):
        prepare_dir(other, ours, other.cells())


def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, tiny):
    from amfs_dist import lifecycle
    from amfs_dist.config import load_config

    cfg = load_config(None, tiny + ["method=iamfs", "train.steps=4", "train.checkpoint_every=1"])
    run = tmp_path / "cell"

    def stop(trainer, row):
        if trainer.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lifecycle.train(cfg, run, progress=False, on_step=stop)
    info = run_cell(str(run), cfg.to_flat(), {"test_steps=0": ["maml.test_steps=0"]})
    assert info["trained_here"] and info["peak_rss_mb"] > 0
    result = json.loads((run / "result.json").read_text())
    assert result["meta_steps"] == 4 and result["resumed"] is True
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    again = run_cell(str(run), cfg.to_flat(), {"test_steps=0": ["maml.test_steps=0"]})
    assert not again["trained_here"] and again["evals"] == info["evals"]


PLOTS = {"steps": ["accuracy_vs_steps.png"], "stability": ["stability.png", "weights.png"],
         "compare": ["weights.png"]}


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_suite_end_to_end_and_a_rerun_trains_nothing(ray_session, tmp_path, capsys):
    outs = {name: tmp_path / name for name in EXPERIMENTS}
    for name, out in outs.items():
        assert main(["experiment", name, "--config", str(SMOKE), "--out", str(out),
                     "--quiet"]) == 0
        manifest = json.loads((out / MANIFEST).read_text())
        cells = set(manifest["cells"])
        assert cells and cells == {p.name for p in (out / "cells").iterdir()}
        with open(out / "cells.csv") as f:
            assert {r["cell"] for r in csv.DictReader(f)} == cells
        md = (out / "results.md").read_text()
        assert all(c in md for c in cells)
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert sum(int(r["seeds"]) for r in rows if r["eval"] == "test") == len(cells)
        for png in ["val_accuracy.png"] + PLOTS.get(name, []):
            assert (out / png).stat().st_size > 1000, (name, png)
    assert "| protonet |" in (outs["compare"] / "results.md").read_text()
    with open(outs["stability"] / "results.csv") as f:
        stab = list(csv.DictReader(f))
    assert len(stab) == 4 and all(r["acc_ci95_seeds"] for r in stab)  # 2 seeds: a t CI
    assert all(r["weight_corrupted"] for r in stab if float(r["data.conflict_fraction"]) > 0)
    with open(outs["steps"] / "results.csv") as f:
        evals = {r["eval"] for r in csv.DictReader(f) if r["method"] == "maml"}
    assert evals == {"test", "test_steps=0", "test_steps=1", "test_steps=2"}

    stamps = {p: p.stat().st_mtime_ns for out in outs.values()
              for p in out.glob("cells/*/*") if p.suffix in (".pt", ".json")}
    capsys.readouterr()
    for name, out in outs.items():
        assert main(["experiment", name, "--config", str(SMOKE), "--out", str(out),
                     "--quiet"]) == 0
        assert "(0 run now)" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_an_experiment_with_workers_inside_cells(head_node, tmp_path):
    """The entrypoint is just the command; each cell's dist.workers go into its placement group."""
    import shutil
    import subprocess
    import sys

    ray_bin, address, env = head_node[:3]
    out = tmp_path / "exp"
    amfs = shutil.which("amfs", path=env["PATH"])
    entry = [amfs] if amfs else [sys.executable, "-m", "amfs_dist"]
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           *entry, "experiment", "steps", "--config", "smoke", "--out", str(out),
           "--quiet", "train.steps=2", "dist.workers=1", "dist.cpus_per_worker=0.5"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "2/2 cells done" in done.stdout + done.stderr
    for cell in (out / "cells").iterdir():
        rows = [json.loads(l) for l in (cell / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(r["exchange_bytes"] > 0 for r in rows)  # on a worker
    assert (out / "accuracy_vs_steps.png").is_file()


def test_test_time_step_evaluations_go_to_the_heads_that_adapt_by_steps():
    from amfs_dist.experiment.run import eval_overrides
    from amfs_dist.experiment.spec import load_experiment
    spec = load_experiment("steps")
    extra = {cell.values["method"]: eval_overrides(spec, cell) for cell in spec.cells()}
    assert set(extra) == {"iamfs", "amfs", "maml", "fomaml"}
    steps = {f"test_steps={k}" for k in spec.test_steps}
    for method, evals in extra.items():
        assert (steps <= set(evals)) == (method in ("maml", "fomaml")), method
        assert not set(evals) & steps or method in ("maml", "fomaml"), method
