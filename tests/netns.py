"""Ray "nodes" on one machine: Linux network namespaces on a private subnet, each with its own
hostname, a Ray head in the first and a Ray node in each of the others.

Topology: a switch namespace holds a bridge `sw`; each node namespace has one veth `eth0` plugged
into it, with address SUBNET.(i), plus its own `lo`. Nothing is added to the machine's own
namespace, so traffic stays between these namespaces (and their loopbacks).

Each process of a node runs under `ip netns exec NS unshare --uts`, with the node's hostname
set; `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts, which maps that hostname
either to 127.0.1.1 (the Debian default: a hostname that resolves to loopback) or to the
node's address (`set_hosts`).

Everything is named from `Nodes.prefix` (PREFIX unless a subclass says otherwise): namespaces
PREFIX0 (switch), PREFIX1..N (nodes), their /etc/netns dirs and the Ray temp dirs
/tmp/PREFIX-N. `remove()` kills every process of those namespaces (all of them started here)
and deletes what was created; `Nodes()` first removes the leftovers of an earlier run that
could not clean up.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = ipaddress.ip_network("10.77.0.0/24")
# two test sessions on one machine (a developer's and CI's) must not share namespaces: the
# names are the only thing they could collide on (each set of namespaces is its own network)
PREFIX = os.environ.get("AMFS_TEST_NETNS_PREFIX", "amfsmn")
RAY_PORT = 6379  # free: each node namespace has its own ports
DASHBOARD_PORT = 8265
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def unavailable() -> str | None:
    """Why namespace nodes cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs `ip` (iproute2) and `unshare` (util-linux)"
    if not Path(RAY).exists():
        return f"no `ray` command next to {sys.executable}"
    probe = f"{PREFIX}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Nodes:
    """`count` namespace nodes; node i (1-based) has address `address(i)`. A subclass with a
    `prefix` of its own has names of its own: its nodes and another module's live side by side."""

    prefix = PREFIX

    def __init__(self, count: int):
        self.count = count
        self.remove()  # an earlier run's leftovers, by our own names only
        self.procs: dict[int, subprocess.Popen] = {}
        try:
            self._make()
        except BaseException:
            self.remove()
            raise

    # -- names -------------------------------------------------------------------------------
    @classmethod
    def ns(cls, i: int) -> str:
        return f"{cls.prefix}{i}"

    @classmethod
    def hostname(cls, i: int) -> str:
        return f"{cls.prefix}-node{i}"

    @staticmethod
    def address(i: int) -> str:
        return str(SUBNET.network_address + i)

    @classmethod
    def temp_dir(cls, i: int) -> Path:
        return Path(f"/tmp/{cls.prefix}-{i}")  # short: Ray's socket paths have a length limit

    def _namespaces(self) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in listed.splitlines()
                if line.split() and line.split()[0].startswith(self.prefix)
                and line.split()[0][len(self.prefix):].isdigit()]

    # -- making ------------------------------------------------------------------------------
    def _make(self) -> None:
        switch = self.ns(0)
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "name", "sw", "type", "bridge")
        _ip("-n", switch, "link", "set", "sw", "up")
        for i in range(1, self.count + 1):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            _ip("-n", switch, "link", "add", "name", f"p{i}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "sw", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/{SUBNET.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        self.set_hosts(loopback=True)

    def set_hosts(self, loopback: bool, peers: bool = False) -> None:
        """Each node's hostname resolves to 127.0.1.1 (loopback=True) or to its address; with
        peers=True the other nodes' hostnames resolve to their addresses (a cluster's usual
        /etc/hosts or DNS). The file is rewritten in place: running processes see it through
        their bind mount."""
        for i in range(1, self.count + 1):
            mine = "127.0.1.1" if loopback else self.address(i)
            others = "".join(f"{self.address(j)}\t{self.hostname(j)}\n"
                             for j in range(1, self.count + 1) if peers and j != i)
            hosts = Path(f"/etc/netns/{self.ns(i)}/hosts")
            with open(hosts, "w") as f:  # truncates the same inode
                f.write(f"127.0.0.1\tlocalhost\n{mine}\t{self.hostname(i)}\n{others}")

    def link(self, i: int, up: bool) -> None:
        """Plug node i's cable in or out (at the switch)."""
        _ip("-n", self.ns(0), "link", "set", f"p{i}", "up" if up else "down")

    # -- processes ---------------------------------------------------------------------------
    def argv(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` run in node i: its network namespace, its own UTS namespace and hostname."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname(i), *cmd]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GLOO_", "NCCL_"))}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH")]
                                              if p))
        env.update(extra)
        return env

    def start_ray(self, i: int, cpus: int = 1, dashboard: bool = False) -> subprocess.Popen:
        """`ray start --block` in node i (the head in node 1); its process is kept. With
        dashboard=True the head serves jobs (`ray job submit`) at `dashboard_url()`."""
        temp = self.temp_dir(i)
        temp.mkdir(exist_ok=True)
        served = (["--include-dashboard=true", f"--dashboard-host={self.address(1)}",
                   f"--dashboard-port={DASHBOARD_PORT}"] if dashboard
                  else ["--include-dashboard=false"])
        where = (["--head", f"--port={RAY_PORT}", *served] if i == 1
                 else [f"--address={self.address(1)}:{RAY_PORT}"])
        log = open(temp / "ray-start.log", "ab")
        proc = subprocess.Popen(
            self.argv(i, [RAY, "start", "--block", *where, f"--node-ip-address={self.address(i)}",
                          f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={temp}",
                          "--object-store-memory=100000000", "--disable-usage-stats"]),
            # Ray's own OOM killer would kill workers when the shared machine is short of memory
            env=self.env(RAY_memory_monitor_refresh_ms="0"), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[i] = proc
        return proc

    def dashboard_url(self) -> str:
        return f"http://{self.address(1)}:{DASHBOARD_PORT}"

    def run(self, i: int, cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
        """`cmd` in node i with RAY_ADDRESS naming the head."""
        return subprocess.run(self.argv(i, cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.env(RAY_ADDRESS=f"{self.address(1)}:{RAY_PORT}", **env))

    def popen(self, i: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        """`cmd` started in node i with RAY_ADDRESS naming the head; the caller ends it."""
        return subprocess.Popen(self.argv(i, cmd), env=self.env(
            RAY_ADDRESS=f"{self.address(1)}:{RAY_PORT}"), **kwargs)

    def wait_for_ray(self, nodes: int, timeout: float = 120.0) -> None:
        """Until `nodes` Ray nodes are alive (asked from node 1)."""
        probe = ("import ray, time, sys\nray.init(log_to_driver=False)\n"
                 f"end = time.monotonic() + {timeout}\n"
                 f"while sum(n['Alive'] for n in ray.nodes()) != {nodes}:\n"
                 "    if time.monotonic() > end: sys.exit(f'nodes: {ray.nodes()}')\n"
                 "    time.sleep(0.5)\n")
        done = self.run(1, [sys.executable, "-c", probe], timeout=timeout + 60)
        if done.returncode != 0:
            logs = "".join((self.temp_dir(i) / "ray-start.log").read_text(errors="replace")[-1500:]
                           for i in self.procs if (self.temp_dir(i) / "ray-start.log").exists())
            raise RuntimeError(f"Ray did not come up: {done.stderr[-3000:]}\n{logs}")

    def pids(self, i: int) -> list[int]:
        """Every process of node i (its namespace's)."""
        listed = subprocess.run(["ip", "netns", "pids", self.ns(i)], capture_output=True,
                                text=True).stdout
        return [int(p) for p in listed.split()]

    def kill(self, i: int) -> None:
        """SIGKILL every process of node i, its raylet included (a node lost)."""
        for pid in self.pids(i):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.pop(i, None)

    # -- removing ----------------------------------------------------------------------------
    def remove(self) -> None:
        """Stop and delete everything of ours: the `ray start` processes gently first, then
        every process left in our namespaces; the namespaces (and with them their links), the
        /etc/netns dirs and the temp dirs."""
        namespaces = self._namespaces()
        for proc in getattr(self, "procs", {}).values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in getattr(self, "procs", {}).values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for ns in namespaces:
            self.kill(int(ns[len(self.prefix):]))
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for path in Path("/etc/netns").glob(f"{self.prefix}[0-9]*"):
            shutil.rmtree(path, ignore_errors=True)
        try:
            Path("/etc/netns").rmdir()  # only when empty: none of ours is left in it
        except OSError:
            pass
        for path in Path("/tmp").glob(f"{self.prefix}-[0-9]*"):
            shutil.rmtree(path, ignore_errors=True)
        self.procs = {}
