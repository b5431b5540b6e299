"""Distributed meta-training on Ray (DESIGN 2): shard workers and the driver-side backend.

Importing this package imports Ray; amfs_dist.train imports it only for dist.workers > 0.
"""
from amfs_dist.distributed.backend import RayBackend, WorkerFailedError, shard

__all__ = ["RayBackend", "WorkerFailedError", "shard"]
