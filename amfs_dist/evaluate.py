"""Episode evaluation (docs/algorithm.md, Evaluation protocol) and `amfs eval` on a finished run."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amfs_dist.algorithms.learner import MetaLearner
from amfs_dist.backend import resolve_device
from amfs_dist.errors import UserError
from amfs_dist.runs import check_run_version, load_module_state, load_torch_file, read_run_config


def evaluate_episodes(learner: MetaLearner, source, split: str, episodes: int, queries: int,
                      batch: int, params=None, progress: bool = False) -> dict:
    """Mean accuracy (or MSE for regression) over `episodes` test episodes and its 95% CI.

    Episodes come from (seed, split, step 0, episode index) only, so every method and every
    run with the same seed sees the same ones. Batch norm uses support-set statistics only.
    adapt_ms_per_task is the time of adaptation + query prediction, batched, per task.
    """
    scores = score_batches(learner, source, split, episode_batches(episodes, batch), queries,
                           params, progress)
    return summarize([scores], episodes, learner.regression)


def episode_batches(episodes: int, batch: int) -> list[list[int]]:
    """The episode indices in batches of `batch`: the unit that shards evaluation over workers
    (a batch is computed the same way whichever worker gets it, so the numbers do not depend
    on the worker count)."""
    return [list(range(first, min(first + batch, episodes))) for first in range(0, episodes, batch)]


def score_batches(learner: MetaLearner, source, split: str, batches: list[list[int]],
                  queries: int, params=None, progress: bool = False) -> dict:
    """Per-episode scores of the given batches: {"values": [float64 tensor per batch] (accuracy,
    or MSE for regression), "losses": [...], "adapt_s": seconds adapting and predicting}."""
    params = params if params is not None else learner.params()
    values, losses, adapt_s = [], [], 0.0
    for ids in tqdm(batches, desc=f"{split} episodes", unit="batch", disable=not progress,
                    leave=False, dynamic_ncols=True):
        ep = source.sample(split, 0, ids, queries=queries)
        t0 = time.perf_counter()
        loss, acc = learner.evaluate(params, ep)
        if loss.device.type == "cuda":
            torch.cuda.synchronize(loss.device)
        adapt_s += time.perf_counter() - t0
        losses.append(loss.double().cpu())
        values.append((loss if learner.regression else acc).double().cpu())
    return {"values": values, "losses": losses, "adapt_s": adapt_s}


def summarize(shards: list[dict], episodes: int, regression: bool) -> dict:
    """The statistics of `episodes` episodes from the score_batches of round-robin shards of
    their batches (shards[k] scored batches k, k + n, ...), put back in episode order."""
    n = len(shards)
    batches = sum(len(s["values"]) for s in shards)
    order = [(b % n, b // n) for b in range(batches)]
    v = torch.cat([shards[k]["values"][i] for k, i in order])
    losses = torch.cat([shards[k]["losses"][i] for k, i in order])
    ci95 = 1.96 * float(v.std(unbiased=True)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    adapt_s = sum(s["adapt_s"] for s in shards)
    out = {"episodes": episodes, "loss": float(losses.mean()),
           "ci95": ci95, "adapt_ms_per_task": 1000.0 * adapt_s / episodes}
    if regression:
        out.update(mse=float(v.mean()), accuracy=None)
    else:
        out.update(accuracy=float(v.mean()))
    return out


def load_run(run_dir: str | Path, overrides: list[str] | None = None):
    """(config, learner with the run's final parameters, the training input shape)."""
    run = Path(run_dir)
    check_run_version(run)
    cfg = read_run_config(run, overrides, flag="")
    model_path = run / "model.pt"
    if not model_path.is_file():
        raise UserError(f"{run}: no model.pt; the run has not finished (resume it with "
                        f"`amfs train --resume {run}`)")
    saved = load_torch_file(model_path, ("model", "input_shape"), "model")
    input_shape = saved["input_shape"]
    if not (isinstance(input_shape, (list, tuple)) and len(input_shape) in (1, 3)
            and all(isinstance(n, int) and n >= 1 for n in input_shape)):
        raise UserError(f"{model_path}: not an amfs model (input_shape {input_shape!r})")
    input_shape = tuple(input_shape)
    learner = MetaLearner(cfg, input_shape, resolve_device(cfg))
    load_module_state(learner.module, saved["model"], model_path,
                      f"{run / 'config.yaml'}{' with the overrides' if overrides else ''}")
    return cfg, learner, input_shape


def eval_run(run_dir: str | Path, episodes: int | None = None,
             overrides: list[str] | dict | None = None, progress: bool = False,
             data_source: str | None = None) -> dict:
    """The test-split evaluation of a finished run (local or s3:// / gs://): the one function
    behind `amfs eval`, a sweep's best run and amfs_dist.evaluate_run.

    episodes: test episodes (default eval.episodes); data_source: evaluate on another data
    set (cross-domain: its images are converted to the run's input shape); overrides:
    key=value strings or a {dotted key: value} dict applied to the run's config.
    """
    from amfs_dist.data import make_task_source
    from amfs_dist.storage import is_uri, staged_run
    if data_source is not None:
        overrides = _with_data_source(overrides, data_source)
    if is_uri(run_dir):  # a run on object storage: evaluate a local copy of what it needs
        with staged_run(str(run_dir), ("config.yaml", "model.pt")) as remote:
            return {**eval_run(remote.local, episodes, overrides, progress), "run": str(run_dir)}
    cfg, learner, input_shape = load_run(run_dir, overrides)
    source = make_task_source(cfg, input_shape, training=False)
    n = episodes or cfg.eval.episodes
    stats = evaluate_episodes(learner, source, "test", n, cfg.eval.queries, cfg.eval.batch,
                              progress=progress)
    return {"run": str(run_dir), "method": cfg.method_name, "inner": cfg.inner_loop,
            "outer": cfg.outer_weighting, "data_source": cfg.data.source,
            "ways": cfg.data.ways, "shots": cfg.data.shots,
            "test_accuracy": stats["accuracy"], "test_ci95": stats["ci95"],
            "test_episodes": n, "test_loss": stats["loss"],
            "adapt_ms_per_task": stats["adapt_ms_per_task"],
            **({"test_mse": stats["mse"]} if "mse" in stats else {})}


def _with_data_source(overrides: list[str] | dict | None, data_source: str) -> list[str] | dict:
    if isinstance(overrides, dict):
        return {**overrides, "data.source": data_source}
    return [*(overrides or []), f"data.source={data_source}"]

