"""Which Ray cluster a command uses, and whether it can ever grant what the command asks for.

- `init_ray`: join the cluster RAY_ADDRESS names (`ray job submit` sets it for its jobs), and
  only that one; without RAY_ADDRESS start a private Ray instance that listens on 127.0.0.1
  only, never the cluster some earlier `ray start` on the machine registered (README.md).
- `check_resources`: a request no node can hold would make Ray wait forever (the shard workers
  until dist.timeout_s, a Tune trial's placement group for ever): refuse it at once, saying
  what was asked and what the cluster has.
- `ray_for_tasks`: both, for a command whose Ray tasks run the project's code (a sweep's
  trials, an experiment's cells).
"""
from __future__ import annotations

import ipaddress
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from amfs_dist import stopping
from amfs_dist.distributed.raycompat import autoscaling_maximum, loopback_node
from amfs_dist.errors import UserError

EPS = 1e-6  # Ray keeps resource amounts to 4 decimals
AUTOSCALER_WAIT = ("shard workers wait at most dist.timeout_s, a sweep's trials and an "
                   "experiment's cells until they are placed; a stop signal ends the wait")
RAY_CONNECT_TIMEOUT_S = 30  # for RAY_ADDRESS's cluster to accept connections (cluster/README.md)


def init_ray(log_to_driver: bool = True, runtime_env: dict | None = None, **local) -> bool:
    """Connect this process to Ray; True when this call connected it (the caller shuts Ray
    down when done), False when it was connected already. `local`: ray.init settings (e.g.
    num_cpus) for a private instance, unused when joining RAY_ADDRESS's cluster."""
    import ray
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:  # asked for: its auth mode is that cluster's business
        check_reachable(address)
        # a private instance on 127.0.0.1 (this module's, or a loopback `ray start`) is joined
        # as one: otherwise Ray turns 127.0.0.1 into the machine's outward address
        with loopback_node() if _is_loopback(_host(address)) else nullcontext():
            ray.init(log_to_driver=log_to_driver, runtime_env=runtime_env)
    else:
        start_private_ray(log_to_driver=log_to_driver, runtime_env=runtime_env, **local)
    stopping.reinstall()  # Ray's native TERM handler aborts the process (SIGABRT, no message)
    return True


def check_reachable(address: str | None = None, timeout_s: float | None = None) -> None:
    """Refuse `address` (default: RAY_ADDRESS, if set) when nothing accepts connections at it
    for timeout_s (default AMFS_RAY_CONNECT_TIMEOUT_S, else RAY_CONNECT_TIMEOUT_S): ray.init
    would retry a cluster that is down for about 8 minutes, printing only warnings. 'auto'
    (Ray finds the address) is left to Ray. Commands call it before they write anything."""
    import socket
    import sys
    import time
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    host_port = address.split("://")[-1].split("/")[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', or a form Ray resolves itself
    host = host.strip("[]")
    if timeout_s is None:
        timeout_s = float(os.environ.get("AMFS_RAY_CONNECT_TIMEOUT_S", RAY_CONNECT_TIMEOUT_S))
    started, said = time.monotonic(), False  # awaited, and for how long
    deadline = started + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            why = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}) "
                            f"after {timeout_s:g} s; start it, or unset RAY_ADDRESS to run on "
                            f"a Ray instance of this command's own")
        if not said and time.monotonic() > started + 5:  # a head (re)starting: say what is
            print(f"amfs: waiting up to {timeout_s:g} s for the Ray cluster at {address} "
                  f"({why})", file=sys.stderr, flush=True)
            said = True
        time.sleep(1.0)


@contextmanager
def ray_for_tasks(requests: list[tuple[list[dict[str, float]], str]]):
    """Ray for the block (init_ray; a private instance ends with it), whose tasks import
    amfs_dist from where this process does. Each (bundles, what) of `requests` that the
    cluster can never hold is refused first (check_resources)."""
    started = init_ray(log_to_driver=False,
                       runtime_env={"env_vars": {"PYTHONPATH": task_pythonpath()}})
    try:
        for bundles, what in requests:
            check_resources(bundles, what)
        yield
    finally:
        if started:
            import ray
            ray.shutdown()


def task_pythonpath() -> str:
    """PYTHONPATH for Ray tasks that import amfs_dist: the directory this process imports it
    from when that is a source checkout, then this process's own PYTHONPATH."""
    import amfs_dist
    root = str(Path(amfs_dist.__file__).resolve().parent.parent)
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p]
    if Path(root).name not in ("site-packages", "dist-packages"):  # a source checkout
        paths.insert(0, root)
    return os.pathsep.join(dict.fromkeys(paths))


def start_private_ray(**init_kwargs) -> None:
    """A new Ray instance of this process's own (never one that `ray start` left), whose every
    server listens on 127.0.0.1 only; `init_kwargs` go to ray.init."""
    import ray
    # Ray >= 2.59 turns token auth on by itself for a new instance, and a later `ray start` /
    # `ray job submit` of the user would disagree with it; loopback binding keeps it private
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with loopback_node():
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                 **init_kwargs)
    host = _host(ray.get_runtime_context().gcs_address)
    if not _is_loopback(host):  # a Ray release that binds otherwise
        ray.shutdown()
        raise RuntimeError(f"the private Ray instance came up on {host}, not on 127.0.0.1; "
                           f"refusing to run an instance other machines can reach (set "
                           f"RAY_ADDRESS to use a cluster of your own)")
    _reap_when_gone()


# Waits for EOF on stdin (the driver has exited, however it died), then SIGKILLs the driver's
# raylet's processes. While it waits it records, every second, the raylet's descendants (by
# parent pid, with their start times, so a reused pid is never hit): once the raylet is gone
# its agents are reparented and no longer say whose they were. Their environment
# (RAY_RAYLET_PID) is read too, though setproctitle may have overwritten it.
_REAPER = r'''
import os, select, signal, sys, time
raylet = sys.argv[1]
mark = b"RAY_RAYLET_PID=" + raylet.encode()


def stat(pid):  # (parent pid, start time) from /proc/PID/stat
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[1], fields[19]


def pids():
    return sorted(filter(str.isdigit, os.listdir("/proc")), key=int)


known = {}  # pid -> start time of the raylet's descendants seen so far
while True:
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 65536):
        break
    family = {raylet}
    for pid in pids():
        try:
            parent, started = stat(pid)
        except OSError:
            continue
        if parent in family:
            family.add(pid)
            known[pid] = started
deadline, quiet = time.monotonic() + 30, 0
while quiet < 3 and time.monotonic() < deadline:
    found = 0
    for pid in pids():
        try:
            ours = known.get(pid) == stat(pid)[1]
            if not ours:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    ours = mark in f.read().split(b"\0")
            if ours:
                os.kill(int(pid), signal.SIGKILL)
                found += 1
        except OSError:
            pass
    quiet = 0 if found else quiet + 1
    time.sleep(0.5)
'''


def _reap_when_gone() -> None:
    """Ray's own processes die with a SIGKILLed driver (Ray sets PR_SET_PDEATHSIG on them),
    but the agents its raylet starts (DashboardAgent, RuntimeEnvAgent) outlive it for ever: a
    small reaper, whose stdin only this process holds open, kills them once it is gone."""
    import subprocess
    import sys

    import psutil
    raylets = [p.pid for p in psutil.Process().children() if p.name() == "raylet"]
    for raylet in raylets:
        # its own session: a Ctrl-C to the terminal's process group must not end it first
        reaper = subprocess.Popen([sys.executable, "-c", _REAPER, str(raylet)],
                                  stdin=subprocess.PIPE, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _reapers.append(reaper)  # its stdin stays open while this process lives


_reapers: list = []


def _host(address: str) -> str:
    """'127.0.0.1:6379' -> '127.0.0.1', '[::1]:6379' -> '::1', 'auto' -> 'auto'."""
    return address.split("://")[-1].rsplit(":", 1)[0].strip("[]")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or 'auto'
        return False


def check_resources(bundles: list[dict[str, float]], what: str) -> None:
    """Raise UserError if the cluster can never place `bundles` (each on one node, all of them
    together): `what` names the request, e.g. 'dist.workers=2 x dist.gpus_per_worker=1'."""
    import ray
    need = _total(bundles)
    asked = f"{what} asks for {_fmt(need)}"
    if len(bundles) > 1:
        asked += f" ({_fmt({k: max(b.get(k, 0.0) for b in bundles) for k in need})} on one node)"
    maximum = autoscaling_maximum()
    if maximum is not None:  # nodes come and go: only the most it can grow to is a limit
        if any(v > maximum.get(k, 0.0) + EPS for k, v in need.items()):
            raise UserError(f"{asked}, but this autoscaling cluster grows to at most "
                            f"{_fmt({k: maximum.get(k, 0.0) for k in need})}")
        now = ray.cluster_resources()
        if any(v > now.get(k, 0.0) + EPS for k, v in need.items()):  # a legitimate wait: say so
            import sys
            print(f"amfs: {asked}; the cluster has {_fmt({k: now.get(k, 0.0) for k in need})} "
                  f"now: waiting for its autoscaler to add nodes (it can grow to "
                  f"{_fmt({k: maximum.get(k, 0.0) for k in need})}); {AUTOSCALER_WAIT}",
                  file=sys.stderr, flush=True)
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    fits_total = all(v <= total.get(k, 0.0) + EPS for k, v in need.items())
    fits_node = all(any(all(v <= node.get(k, 0.0) + EPS for k, v in b.items()) for node in nodes)
                    for b in bundles)
    if not (fits_total and fits_node):
        has = _fmt({k: total.get(k, 0.0) for k in need})
        if len(nodes) > 1:
            biggest = {k: max(node.get(k, 0.0) for node in nodes) for k in need}
            has += f", at most {_fmt(biggest)} on one node"
        free = ray.available_resources()
        raise UserError(f"{asked}, but the cluster ({len(nodes)} node{'s' * (len(nodes) != 1)}, "
                        f"not autoscaling) has {has} ({_fmt({k: free.get(k, 0.0) for k in need})} "
                        f"free now)")


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"
