"""Ray Tune + Optuna sweeps (`amfs tune`): a sweep file's search space, the trial function, results.

space.py    the sweep file: base config, search space, sweep settings; strict validation
sweep.py    the Tuner (OptunaSearch TPE + ASHA), trial placement groups, resume
results.py  trial table (Parquet/CSV/markdown), best config YAML, plot, best model's test result
cli.py      the `amfs tune` command

Ray, Optuna and matplotlib are imported only when a sweep runs, so a bad sweep file is reported
before any of them start.
"""
from amfs_dist.tune.space import SweepSpec, load_sweep

__all__ = ["SweepSpec", "load_sweep"]
