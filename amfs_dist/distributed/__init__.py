"""Distributed meta-training on Ray (docs/scaling.md): shard workers and the driver-side backend.

Importing this package imports Ray; amfs_dist.train imports it only for dist.workers > 0.
"""
from amfs_dist.distributed.backend import RayBackend, shard
from amfs_dist.distributed.collective import CollectiveBackend
from amfs_dist.errors import WorkerFailedError

__all__ = ["CollectiveBackend", "RayBackend", "WorkerFailedError", "shard"]
