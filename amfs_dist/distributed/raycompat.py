"""Every use of Ray's private internals, in one module, for the Ray release they were written for.

They were written against Ray 2.60 (pyproject.toml pins ray==2.60.*). Under another release the
first shim used warns once (RayCompatWarning) that they may not hold. A shim whose internal is
gone, or no longer does what it did, warns (RayCompatWarning) and takes the fallback written
next to it; tests/test_raycompat.py turns that warning into an error, so a Ray upgrade that
breaks a shim fails there, not silently in a user's run.
"""
from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager

WRITTEN_FOR = "2.60"


class RayCompatWarning(UserWarning):
    """A private Ray internal that this module relies on is missing or behaves otherwise."""


def supported(version: str) -> bool:
    return version == WRITTEN_FOR or version.startswith(WRITTEN_FOR + ".")


@functools.cache
def check_ray_version() -> bool:
    """True for the installed Ray release the shims were written for; otherwise warn (once)."""
    import ray
    if supported(ray.__version__):
        return True
    warnings.warn(f"amfs_dist was written for Ray {WRITTEN_FOR}.x, and Ray {ray.__version__} is "
                  f"installed: the Ray internals it uses may have changed (pip install "
                  f"'ray[default,train,tune]=={WRITTEN_FOR}.*')", RayCompatWarning, stacklevel=3)
    return False


def _fallback(what: str, instead: str) -> None:
    import ray
    warnings.warn(f"Ray {ray.__version__}: {what}; {instead}", RayCompatWarning, stacklevel=3)


@contextmanager
def loopback_node():
    """Within the block, a Ray node started or joined by this process takes 127.0.0.1 as its
    address, so every server it starts binds to loopback only.

    Upstream: Ray has no public setting for that. ray.init and `ray start` turn 127.0.0.1 into
    the machine's outward address (ray._private.services.resolve_ip_for_localhost) and bind the
    GCS, raylet, worker and agent servers to every interface. Only its single-machine mode
    (ray_constants.ENABLE_RAY_CLUSTER false, what RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets when
    Ray is imported, ray-project/ray#18730) keeps the node on the loopback address, and
    services.get_node_ip_address reads the constant at each call, so it is set for the block.
    Fallback: none is possible; the block runs unchanged and the caller must check where the
    node came up (cluster.start_private_ray refuses one off loopback)."""
    check_ray_version()
    try:
        from ray._private import ray_constants
        saved = ray_constants.ENABLE_RAY_CLUSTER
    except (ImportError, AttributeError):
        _fallback("ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone",
                  "Ray picks the node's address itself")
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def autoscaling_maximum() -> dict[str, float] | None:
    """What the connected cluster's autoscaler can grow it to, from the node types it publishes
    in the GCS; None for a cluster of fixed size.

    Upstream: Ray has no public API for it; Ray Train v2 (WorkerGroup) and Ray Data's hash
    shuffle read the same ray._private.state.state.get_max_resources_from_cluster_config.
    Fallback: None, i.e. the caller judges by the nodes the cluster has now."""
    check_ray_version()
    try:
        from ray._private.state import state
        read = state.get_max_resources_from_cluster_config
    except (ImportError, AttributeError):
        _fallback("ray._private.state.state.get_max_resources_from_cluster_config is gone",
                  "an autoscaling cluster is judged by the nodes it has now")
        return None
    return read()


def actor_placed(actor) -> bool:
    """Whether Ray has leased a worker process on some node for `actor`: an actor still waiting
    for a node with room has no address in the GCS's actor table yet, and one created a moment
    ago may have no entry at all (`.remote()` returns before the GCS has registered it).

    Upstream: the public state API (ray.util.state.get_actor) asks the dashboard's state server,
    which the private instances amfs starts do not run; the GCS's own actor table behind it is
    read by ray._private.state.actors. Fallback: True (the actor counts as placed, and the first
    call on it, bounded by dist.timeout_s, finds out)."""
    check_ray_version()
    try:
        from ray._private.state import actors
        entry = actors(actor._actor_id.hex())
    except Exception as e:  # gone, reshaped, or the GCS unreachable: never fail the run here
        _fallback(f"the GCS actor table (ray._private.state.actors) cannot be read ({e!r})",
                  "a replacement worker counts as placed")
        return True
    if not entry:  # not in the table yet: `.remote()` registers an actor with the GCS later
        return False
    # a dead or restarting actor's entry has no address (the first call on it finds out)
    address = (entry.get("Address") or {}).get("IPAddress")
    return bool(address) or entry.get("State") not in ("DEPENDENCIES_UNREADY", "PENDING_CREATION")


def tune_legacy_output() -> None:
    """Make Tune show the progress reporter passed to it (its legacy output engine).

    Upstream: since Ray 2.5 Tune's default output engine ignores a passed-in progress_reporter
    ("AIR_VERBOSITY is set, ignoring passed-in ProgressReporter", ray/tune/tune.py); the
    environment variable RAY_AIR_NEW_OUTPUT=0, read at each run
    (ray.tune.experimental.output.get_air_verbosity), is the only way back to the legacy one.
    Fallback: none; Tune prints progress in its own format."""
    check_ray_version()
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        from ray.tune.experimental.output import get_air_verbosity
        legacy = get_air_verbosity(1) is None
    except (ImportError, AttributeError):
        legacy = False
    if not legacy:
        _fallback("Tune no longer reads RAY_AIR_NEW_OUTPUT=0 as the legacy output engine",
                  "its progress shows in Tune's own format")
