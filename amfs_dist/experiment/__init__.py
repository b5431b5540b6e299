"""`amfs experiment NAME`: the article's experiments as grids of ordinary runs on Ray.

spec.py     the experiment file: base config, grid (x variants x seeds), resources, extra evals
run.py      the output directory (manifest, cells/), one Ray task per cell in its placement group
report.py   results.csv / results.md (means over seeds, t-based 95% CI), cells.csv, PNG plots
cli.py      the `amfs experiment` command
"""
from amfs_dist.experiment.spec import EXPERIMENTS, ExperimentSpec, load_experiment

__all__ = ["EXPERIMENTS", "ExperimentSpec", "load_experiment"]
