"""The Ray private-API shims (distributed/raycompat.py) still work on the installed Ray.

Every test here turns RayCompatWarning into an error: a shim that takes its fallback (its Ray
internal gone, or no longer doing what it did) fails its test. The *_fallback_* tests check
that the fallback, when taken, says so and does what its docstring promises.
"""
from __future__ import annotations

import os

import pytest
import ray
from ray._private import ray_constants, services

from amfs_dist.distributed import raycompat
from amfs_dist.distributed.raycompat import RayCompatWarning

pytestmark = pytest.mark.filterwarnings(
    "error::amfs_dist.distributed.raycompat.RayCompatWarning")


@pytest.fixture
def fresh_version_check():
    raycompat.check_ray_version.cache_clear()
    yield
    raycompat.check_ray_version.cache_clear()


def test_installed_ray_is_the_release_the_shims_were_written_for(fresh_version_check):
    assert raycompat.check_ray_version()


def test_another_ray_release_is_warned_about_once(fresh_version_check, monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.warns(RayCompatWarning, match=r"written for Ray 2\.60\.x, and Ray 2\.61\.0"):
        assert not raycompat.check_ray_version()
    assert not raycompat.check_ray_version()  # cached: the warning above came once


@pytest.mark.parametrize("version, ok", [("2.60.0", True), ("2.60.3", True), ("2.60", True),
                                         ("2.600.0", False), ("2.61.0", False), ("3.60.0", False)])
def test_supported_release_matches_major_and_minor(version, ok):
    assert raycompat.supported(version) is ok


# -- loopback_node -------------------------------------------------------------------------------
def test_loopback_node_makes_ray_pick_the_loopback_address():
    saved = ray_constants.ENABLE_RAY_CLUSTER
    with raycompat.loopback_node():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        # what ray.init and `ray start` ask for the node's address
        assert services.get_node_ip_address() == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is saved


def test_loopback_node_fallback_warns_and_runs_the_block(monkeypatch):
    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    ran = []
    with pytest.warns(RayCompatWarning, match="ENABLE_RAY_CLUSTER is gone"):
        with raycompat.loopback_node():
            ran.append(True)
    assert ran == [True]


# -- autoscaling_maximum -------------------------------------------------------------------------
@pytest.mark.ray
def test_autoscaling_maximum_reads_a_fixed_size_cluster_as_none(ray_session):
    assert raycompat.autoscaling_maximum() is None


def test_autoscaling_maximum_fallback_warns_and_returns_none(monkeypatch):
    from ray._private.state import GlobalState
    monkeypatch.delattr(GlobalState, "get_max_resources_from_cluster_config")
    with pytest.warns(RayCompatWarning, match="get_max_resources_from_cluster_config is gone"):
        assert raycompat.autoscaling_maximum() is None


# -- tune_legacy_output --------------------------------------------------------------------------
# -- actor_placed --------------------------------------------------------------------------------
@pytest.mark.ray
def test_actor_placed_tells_a_placed_actor_from_one_waiting_for_room(ray_session):
    @ray.remote(num_cpus=0)
    class Placed:
        def ping(self):
            return 1

    @ray.remote(num_cpus=10_000)  # no node of the test cluster has room for it
    class Waiting:
        pass

    placed, waiting = Placed.remote(), Waiting.remote()
    try:
        ray.get(placed.ping.remote(), timeout=120)
        assert raycompat.actor_placed(placed)
        assert not raycompat.actor_placed(waiting)
    finally:
        ray.kill(placed)
        ray.kill(waiting)


@pytest.mark.ray
def test_an_actor_the_gcs_has_not_registered_yet_is_not_placed(ray_session):
    """`.remote()` returns before the GCS has registered the actor: an actor id its table
    does not hold yet is waiting for a node, not placed (a replacement taken for placed was
    waited for silently for dist.timeout_s plus the start-up grace)."""
    class JustCreated:
        _actor_id = ray.ActorID.from_random()

    assert raycompat.actor_placed(JustCreated()) is False


def test_actor_placed_fallback_warns_and_counts_the_actor_as_placed(monkeypatch):
    from ray._private import state
    monkeypatch.delattr(state, "actors")
    with pytest.warns(RayCompatWarning, match="actor table"):
        assert raycompat.actor_placed(object()) is True


def test_tune_legacy_output_turns_tunes_new_output_engine_off(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)  # restored after the test
    assert get_air_verbosity(1) is not None  # the new engine, by default
    raycompat.tune_legacy_output()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert get_air_verbosity(1) is None  # Tune then uses the passed-in progress reporter


def test_tune_legacy_output_fallback_warns(monkeypatch):
    import ray.tune.experimental.output as output
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.setattr(output, "get_air_verbosity", lambda verbose: verbose)
    with pytest.warns(RayCompatWarning, match="no longer reads RAY_AIR_NEW_OUTPUT"):
        raycompat.tune_legacy_output()
