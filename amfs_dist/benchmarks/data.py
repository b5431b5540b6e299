"""`amfs bench data`: how fast the episode sampler draws from memory-mapped stores.

Writes an Omniglot-sized store (1623 classes x 20 images, 1x28x28) and a mini-ImageNet-sized
one (100 classes x 600 images, 3x84x84; --scale shrinks the images per class) of random
pixels with write_store, opens them with open_store and times ImageEpisodeSampler on 5-way
1-shot 15-query batches of 32 tasks. Where the trainer's benchmark is available it also
prints how many tasks per second the trainer consumes from the same store: the sampler must
never be what the trainer waits for (sampler_headroom > 1).
The stores are freshly written, so their pages are in the page cache (warm-cache figures).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

STORES = {  # name -> (classes, images per class, image shape)
    "omniglot-sized": (1623, 20, (1, 28, 28)),
    "mini-imagenet-sized": (100, 600, (3, 84, 84)),
}
WAYS, SHOTS, QUERIES = 5, 1, 15


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="episodes/s drawn from memory-mapped stores",
                              description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the images per class to write (0 < scale <= 1; at least "
                        f"{SHOTS + QUERIES} per class are kept) for quick runs")
    p.add_argument("--tasks", type=int, default=32, help="tasks per sampled batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches per store")
    p.add_argument("--trainer-steps", type=int, default=3,
                   help="timed steps for the trainer's consumption rate, when available "
                        "(0: skip it)")
    p.add_argument("--trainer-tasks", type=int, default=8,
                   help="the trainer's meta-batch for its rate (default 8: a CPU step of 32 "
                        "mini-ImageNet-sized tasks needs more than 24 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def random_store(root: Path, classes: int, per_class: int, shape: tuple[int, int, int],
                 seed: int) -> Path:
    from amfs_dist.data.episodes import ImageSet
    from amfs_dist.data.store import write_store

    rng = np.random.default_rng(seed)
    n = classes * per_class
    images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    order = rng.permutation(classes)  # a split assignment like the real ones: 64/16/20 %
    cut = [int(classes * 0.64), int(classes * 0.80)]
    data = ImageSet(images=images, labels=np.repeat(np.arange(classes), per_class),
                    class_names=[f"class{c:04d}" for c in range(classes)],
                    splits=dict(zip(("train", "val", "test"),
                                    (np.sort(s) for s in np.split(order, cut)))),
                    groups=[""] * classes)
    path = root / "store"
    write_store(path, data, source="random", split_name="bench")
    return path


def sampler_rate(data, tasks: int, batches: int, seed: int) -> float:
    """Episodes per second drawn from the train split (after one warm-up batch)."""
    from amfs_dist.data.episodes import ImageEpisodeSampler

    sampler = ImageEpisodeSampler(data, WAYS, SHOTS, QUERIES, seed)
    task_ids = list(range(tasks))
    sampler.sample("train", 0, task_ids)
    start = time.perf_counter()
    for step in range(1, batches + 1):
        sampler.sample("train", step, task_ids)
    return batches * tasks / (time.perf_counter() - start)


def trainer_rate(store: Path, tasks: int, steps: int) -> tuple[float | None, str | None]:
    """Tasks per second the trainer consumes from `store`, or (None, why not)."""
    if steps < 1:
        return None, "trainer rate skipped (--trainer-steps 0)"
    try:
        from amfs_dist.benchmarks.train import tasks_per_second
    except ImportError as e:
        return None, f"trainer benchmark not available ({e})"
    from amfs_dist.config import load_config

    try:
        cfg = load_config(overrides={"data.source": str(store), "data.ways": WAYS,
                                     "data.shots": SHOTS, "data.queries": QUERIES,
                                     "train.meta_batch": tasks})
        rate = tasks_per_second(cfg, steps)
        return float(rate["tasks_per_s"]), None
    except Exception as e:  # the sampler's figure still stands; say why the other is missing
        return None, f"{type(e).__name__}: {e}"


def trainer_rate_isolated(store: Path, tasks: int, steps: int
                          ) -> tuple[float | None, str | None]:
    """trainer_rate in a child process: a trainer that runs out of memory (the OOM killer)
    costs its own figure, not the sampler's."""
    if steps < 1:
        return trainer_rate(store, tasks, steps)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(trainer_rate, store, tasks, steps).result()
        except BrokenProcessPool:
            return None, "the trainer's process died (out of memory?)"


def run(args: argparse.Namespace) -> int:
    from amfs_dist.data.store import open_store
    from amfs_dist.errors import UserError

    if not 0 < args.scale <= 1:
        raise UserError(f"--scale must be in (0, 1], got {args.scale}")
    for name, (classes, per_class, shape) in STORES.items():
        per_class = max(SHOTS + QUERIES, round(per_class * args.scale))
        with tempfile.TemporaryDirectory(prefix="amfs-bench-data-") as tmp:
            start = time.perf_counter()
            path = random_store(Path(tmp), classes, per_class, shape, args.seed)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            data = open_store(path)
            open_s = time.perf_counter() - start
            sampler = sampler_rate(data, args.tasks, args.batches, args.seed)
            trainer, why = trainer_rate_isolated(path, args.trainer_tasks, args.trainer_steps)
            record = {
                "bench": "data", "store": name, "classes": classes,
                "images": classes * per_class, "image_shape": list(shape),
                "ways": WAYS, "shots": SHOTS, "queries": QUERIES, "tasks_per_batch": args.tasks,
                "write_s": round(write_s, 3), "open_s": round(open_s, 4),
                "sampler_episodes_per_s": round(sampler, 1),
                "sampler_ms_per_batch": round(1000 * args.tasks / sampler, 2),
                "trainer_tasks_per_s": None if trainer is None else round(trainer, 1),
                "trainer_meta_batch": args.trainer_tasks,
                "sampler_headroom": None if not trainer else round(sampler / trainer, 1),
            }
            if why:
                record["trainer_note"] = why
            print(json.dumps(record), flush=True)
            del data  # release the memory map before the folder goes
    return 0
