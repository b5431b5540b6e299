"""Distributed meta-training on Ray (docs/scaling.md): the exact and sketch exchanges on Ray
actors (backend.py, worker.py), the collective one on Ray Train (raytrain.py, collective.py).

Importing this package imports Ray; amfs_dist.train imports it only for dist.workers > 0.
"""
from amfs_dist.distributed.backend import RayBackend, shard
from amfs_dist.errors import WorkerFailedError

__all__ = ["RayBackend", "WorkerFailedError", "shard"]
