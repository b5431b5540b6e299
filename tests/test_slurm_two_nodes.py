"""cluster/slurm/amfs-ray.sbatch on a two-node Slurm, and `ray job submit` to a two-node Ray
cluster: the nodes are Linux network namespaces on one machine (tests/netns.py).

The Slurm is this module's own: in node 1 munged (every node's clients and daemons reach its
socket by path), a MariaDB server and slurmdbd (so that `sacct` has records), slurmctld and a
slurmd; in node 2 a slurmd. Each slurmd runs in its node's network and UTS namespace
with its hostname as NodeName and the node's address as NodeAddr, and with a directory of its
own for its jobs' Ray temp dirs (AMFS_RAY_TMPDIR, a bind mount: a real node's local disk);
everything shared (configuration, munge
socket, job logs, run directories) lives in a directory outside /tmp, as on a cluster's shared
storage. Each node's hostname resolves to 127.0.1.1 there (the Debian default) and the other
node's to its address. Clients (sbatch, squeue, sacct) run in node 1.

The jobs run the shipped script as a user would, with one stand-in: the `amfs` first on their
PATH runs the real command, then writes which nodes the run's workers were on (from Ray's
actor table, before the script stops Ray). The `ray job submit` test starts its own Ray
cluster on the same nodes (netns.Nodes.start_ray), beside the Slurm.

Needs root, iproute2 and the Debian packages slurm-wlm, slurmdbd, munge and mariadb-server
(.ci/run installs them where apt is there); without them the tests skip and say why.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

import netns
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "slurm" / "amfs-ray.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "sacctmgr", "sinfo", "srun")
SACCT_FORMAT = "JobID,JobName,State,ExitCode,NNodes,NodeList,Elapsed"
TRAIN = ["train", "--no-progress", "--resume-if-exists", *TINY, "dist.workers=2",
         "dist.cpus_per_worker=1", "dist.timeout_s=60"]

# Which nodes a run's workers were on, from Ray's actor table (it keeps ended actors): one JSON
# line {"rc": ..., "ips": [...]} appended to $AMFS_TEST_WORKERS. The class names are those of
# the shard workers of each exchange.
WORKER_IPS = """
import json, os, ray
from ray._private import state
if not ray.is_initialized():
    ray.init(log_to_driver=False, logging_level="ERROR")
workers = [a for a in state.actors().values()
           if a["ActorClassName"].endswith(("ShardWorker", "CollectiveWorker", "RayTrainWorker"))]
job = max((a["JobID"] for a in workers), default=None)
ips = sorted(a["Address"]["IPAddress"] for a in workers if a["JobID"] == job)
"""
# `amfs` as the job runs it (first on its PATH): the real command, then the workers' nodes
AMFS_THEN_WORKER_IPS = f"""#!{sys.executable}
import sys
from amfs_dist.cli import main
rc = main(sys.argv[1:])
{WORKER_IPS}
with open(os.environ["AMFS_TEST_WORKERS"], "a") as f:
    f.write(json.dumps({{"rc": rc, "ips": ips}}) + "\\n")
sys.exit(rc)
"""


# each node's own directory for its jobs' Ray temp dirs, at one short path (Ray's socket paths
# have a length limit); empty on the machine, removed when the cluster goes
NODE_TMP = Path("/run/amfssl-tmp")


class SlurmNodes(netns.Nodes):
    prefix = "amfssl"  # beside tests/test_multinode.py's nodes, never the same namespaces

    def node_argv(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` in node i as a node's daemon: its network namespace, hostname and hosts file,
        and `temp_dir(i)/tmp` mounted on NODE_TMP (the jobs' AMFS_RAY_TMPDIR: each node's Ray
        temp dirs are its own, as on a real node's local disk), in a mount namespace of its
        own (private: no mount reaches the machine). /tmp itself stays the machine's: the
        checkout and its virtual environment may live there. Not `ip netns exec`: its fresh
        /sys has no cgroup hierarchy, which slurmd needs."""
        own = self.temp_dir(i) / "tmp"
        own.mkdir(parents=True, exist_ok=True)
        NODE_TMP.mkdir(exist_ok=True)
        return ["nsenter", f"--net=/run/netns/{self.ns(i)}", "unshare", "--uts", "--mount",
                "sh", "-c", 'hostname "$0" && mount --bind "$1" /etc/hosts && '
                'mount --bind "$2" "$3" && shift 3 && exec "$@"',
                self.hostname(i), f"/etc/netns/{self.ns(i)}/hosts", str(own), str(NODE_TMP),
                *cmd]


def missing() -> str | None:
    why = netns.unavailable()
    if why:
        return f"no namespace nodes here: {why}"
    absent = [t for t in DAEMONS + CLIENTS if shutil.which(t) is None]
    if absent:
        return (f"Slurm with accounting is not installed ({', '.join(absent)} missing: apt-get "
                "install slurm-wlm slurmdbd munge mariadb-server)")
    return None


pytestmark = [pytest.mark.slow, pytest.mark.ray]


class Slurm:
    """The running two-node Slurm: its shared directory and clients run in node 1."""

    def __init__(self, nodes: SlurmNodes, shared: Path):
        self.nodes, self.shared = nodes, shared
        self.bin = shared / "bin"
        self.env = nodes.env(SLURM_CONF=str(shared / "slurm.conf"),
                             PATH=os.pathsep.join([str(self.bin), str(Path(sys.executable).parent),
                                                   os.environ.get("PATH", "")]))

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        done = subprocess.run(self.nodes.argv(1, list(cmd)), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0 or not check, f"{cmd}: {done.stdout}{done.stderr}"
        return done.stdout

    def succeeds(self, *cmd: str) -> bool:
        done = subprocess.run(self.nodes.argv(1, list(cmd)), env=self.env, capture_output=True,
                              text=True, timeout=60)
        self.last = done.stdout + done.stderr
        return done.returncode == 0

    def submit(self, *args: str, workers_log: Path) -> str:
        out = self.run("sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--time=15",
                       f"--output={self.shared}/job-%j.out", f"--chdir={self.shared}",
                       f"--export=ALL,AMFS_TEST_WORKERS={workers_log},AMFS_RAY_TMPDIR={NODE_TMP}",
                       str(SCRIPT), *args)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id)))

    def wait(self, job_id: str, until: set[str] = ENDED, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in until:
            assert time.monotonic() < deadline, \
                f"job {job_id} still {job['JobState']} after {timeout} s:\n{self.output(job_id)}"
            time.sleep(1)
        return job

    def job_output(self, job_id: str) -> str:
        path = self.shared / f"job-{job_id}.out"
        return path.read_text() if path.exists() else ""

    def output(self, job_id: str) -> str:
        """The job's output, then what the daemons logged about it (a failed launch shows
        only there)."""
        text = self.job_output(job_id)
        mention = re.compile(rf"\bjob(id=| )?{job_id}\b", re.IGNORECASE)
        for log in sorted((self.shared / "log").glob("slurm*.log")):
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if mention.search(ln)]
            text += f"\n--- {log.name} on job {job_id} ---\n" + "\n".join(lines[-40:])
        return text

    def sacct(self, job_id: str, *options: str, timeout: float = 60) -> list[dict[str, str]]:
        """The job's accounting rows once the job's own row has its end state (slurmctld sends
        them to slurmdbd a moment after the end); printed, for the record."""
        deadline = time.monotonic() + timeout
        cmd = ["sacct", "-j", job_id, f"--format={SACCT_FORMAT}", "-P", *options]
        while True:
            out = self.run(*cmd)
            lines = out.strip().splitlines()
            rows = [dict(zip(lines[0].split("|"), ln.split("|"))) for ln in lines[1:]]
            if any(r["JobID"] == job_id and r["State"] in ENDED for r in rows):
                print(f"$ {' '.join(cmd)}\n{out}")
                return rows
            assert time.monotonic() < deadline, f"no end state in sacct for {job_id}:\n{out}"
            time.sleep(1)


def slurm_confs(nodes: SlurmNodes, shared: Path) -> tuple[str, str]:
    """slurm.conf and slurmdbd.conf."""
    head = nodes.address(1)
    auth = f"AuthType=auth/munge\nAuthInfo=socket={shared}/munge.sock,cred_expire=5\n"
    # three CPUs a node, whatever the machine has (config_overrides): the module's three jobs of
    # one CPU a node run at once; RealMemory: any machine has it
    node_lines = "".join(f"NodeName={nodes.hostname(i)} NodeAddr={nodes.address(i)} CPUs=3 "
                         "RealMemory=500 State=UNKNOWN\n" for i in (1, 2))
    # cred_expire=5, sched_interval=2, bf_interval=2: as tests/slurm_cluster.sh explains
    return f"""ClusterName=amfs-two
SlurmctldHost={nodes.hostname(1)}({head})
SlurmUser=root
SlurmdUser=root
{auth}CredType=cred/munge
StateSaveLocation={shared}/state
SlurmdSpoolDir={shared}/spool/%n
SlurmctldPidFile={shared}/slurmctld.pid
SlurmdPidFile={shared}/slurmd-%n.pid
SlurmctldLogFile={shared}/log/slurmctld.log
SlurmdLogFile={shared}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={head}
AccountingStoragePass={shared}/munge.sock
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""", f"""{auth}DbdHost={nodes.hostname(1)}
DbdAddr={head}
SlurmUser=root
PidFile={shared}/slurmdbd.pid
LogFile={shared}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=root
StorageLoc=slurm_acct_db
"""


@pytest.fixture(scope="module")
def nodes():
    why = missing()
    if why:
        pytest.skip(why)
    cluster = SlurmNodes(2)
    try:
        cluster.set_hosts(loopback=True, peers=True)
        yield cluster
    finally:
        cluster.remove()


def wait_until(what: str, ready, procs: dict[str, subprocess.Popen], logs: Path,
               timeout: float = 60, extra=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        ended = [name for name, p in procs.items() if p.poll() is not None]
        tails = "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}"
                        for log in sorted(logs.glob("*.log")))
        assert not ended and time.monotonic() < deadline, \
            f"{what}: not within {timeout:g} s (ended: {ended}){tails}{extra()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm(nodes):
    # outside /tmp: each node's /tmp is its own, this directory is the cluster's shared storage
    shared = Path(tempfile.mkdtemp(prefix="amfs-slurm2-", dir="/var/tmp"))
    procs: dict[str, subprocess.Popen] = {}  # by log name
    logs = shared / "log"

    def start(argv: list[str], log: str) -> subprocess.Popen:
        with (logs / log).open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(nodes.env(), SLURM_CONF=str(shared / "slurm.conf")))
        procs[log] = proc
        return proc

    try:
        for sub in ("state", "log", "bin", "db", *(f"spool/{nodes.hostname(i)}" for i in (1, 2))):
            (shared / sub).mkdir(parents=True)
        conf, dbd_conf = slurm_confs(nodes, shared)
        (shared / "slurm.conf").write_text(conf)
        (shared / "slurmdbd.conf").write_text(dbd_conf)
        (shared / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable one
        (shared / "bin" / "amfs").write_text(AMFS_THEN_WORKER_IPS)
        (shared / "bin" / "amfs").chmod(0o755)
        key = shared / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # in node 1 (no network needed: clients reach its socket by path), so that an earlier
        # run's leftovers are ended with the namespaces (netns.Nodes() removes them first)
        start(nodes.argv(1, ["munged", "--foreground", "--force", f"--socket={shared}/munge.sock",
                             f"--key-file={key}", f"--pid-file={shared}/munged.pid",
                             f"--log-file={logs}/munged.log", f"--seed-file={shared}/munge.seed"]),
              "munged.out")
        # a small MariaDB for slurmdbd, on node 1's own loopback
        mariadb = ["--no-defaults", f"--datadir={shared}/db", "--user=root",
                   "--innodb-log-file-size=4M", "--innodb-buffer-pool-size=8M"]
        subprocess.run(["mariadb-install-db", *mariadb, "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
        start(nodes.argv(1, ["mariadbd", *mariadb, "--bind-address=127.0.0.1",
                             f"--socket={shared}/mysql.sock", "--skip-grant-tables",
                             f"--pid-file={shared}/mariadb.pid"]), "mariadbd.log")
        start(nodes.argv(1, ["slurmdbd", "-D"]), "slurmdbd.out")
        slurm = Slurm(nodes, shared)
        wait_until("slurmdbd", lambda: slurm.succeeds("sacctmgr", "-n", "list", "cluster"),
                   procs, logs, extra=lambda: f"\n--- sacctmgr ---\n{slurm.last}")
        slurm.run("sacctmgr", "-i", "add", "cluster", "amfs-two")
        start(nodes.argv(1, ["slurmctld", "-D", "-f", str(shared / "slurm.conf")]),
              "slurmctld.out")
        for i in (1, 2):
            start(nodes.node_argv(i, ["slurmd", "-D", "-N", nodes.hostname(i), "-f",
                                              str(shared / "slurm.conf")]), f"slurmd-{i}.out")
        wait_until("two idle nodes", lambda: slurm.run("sinfo", "-h", "-N", "-o", "%N %T",
                                                       check=False).split().count("idle") == 2,
                   procs, logs)
        yield slurm
    finally:
        for proc in reversed(procs.values()):  # slurmds first, munged last
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(shared, ignore_errors=True)
        with contextlib.suppress(OSError):
            NODE_TMP.rmdir()  # only when empty: nothing of ours is left in it


def job_tmp(nodes: SlurmNodes, i: int, job_id: str) -> Path:
    """The job's Ray temp dir on node i, seen from the machine."""
    return nodes.temp_dir(i) / "tmp" / f"ray-{job_id}"


def assert_two_node_job_completed(slurm: Slurm, job_id: str, workers_log: Path) -> str:
    nodes = slurm.nodes
    job = slurm.wait(job_id)
    log = slurm.job_output(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", slurm.output(job_id)
    # the head's address is the one routed to node 2, not the 127.0.1.1 its hostname has
    head = nodes.address(1)
    assert re.search(rf"head {nodes.hostname(1)} at {re.escape(head)}:\d+, 2 node\(s\)", log), log
    assert re.search(rf"amfs-ray: 2 node\(s\) at {re.escape(head)}:\d+: 2 CPUs, 0 GPUs", log), log
    log_without_requeue = re.sub(r".*CANCELLED AT \S+ DUE TO JOB REQUEUE.*\n", "", log)
    assert not re.search(r"srun: error|Killed|Terminated|CANCELLED|Traceback",
                         log_without_requeue), log
    # one worker on each node, in every run of the job
    runs = [json.loads(line) for line in workers_log.read_text().splitlines()]
    assert runs and all(r["ips"] == [nodes.address(1), nodes.address(2)] for r in runs), runs
    assert not any(job_tmp(nodes, i, job_id).exists() for i in (1, 2))  # removed on both nodes
    rows = {r["JobID"]: r for r in slurm.sacct(job_id)}
    assert rows[job_id]["State"] == "COMPLETED" and rows[job_id]["NNodes"] == "2", rows
    assert rows[job_id]["NodeList"] == f"{nodes.prefix}-node[1-2]", rows
    steps = {r["JobName"]: r for r in rows.values()}
    assert steps["ray-head"]["NodeList"] == nodes.hostname(1), rows
    assert steps["ray-workers"]["NodeList"] == nodes.hostname(2), rows
    return log


class Job(NamedTuple):
    id: str
    run: Path  # its --out
    workers_log: Path  # where its `amfs` wrote the nodes of its workers


REQUEUED_STEPS = 30
JOBS = {  # this module's Slurm jobs: extra `amfs train` arguments
    # checkpoint_every > steps: the only checkpoint before the end is the one USR1 makes
    "requeued": [f"train.steps={REQUEUED_STEPS}", f"train.checkpoint_every={REQUEUED_STEPS + 10}"],
    "exact": ["train.steps=3", "dist.exchange=exact"],
    "collective": ["train.steps=3", "dist.exchange=collective"],
}


@pytest.fixture(scope="module")
def jobs(slurm) -> dict[str, Job]:
    """Every job of JOBS, submitted at once: with three CPUs a node Slurm runs them side by
    side, and each test waits for its own. The "requeued" job gets, at its first step, the
    USR1 that `#SBATCH --signal=B:USR1@300` sends 300 s before the time limit; it continues
    while the other tests run."""
    submitted = {}
    for name, extra in JOBS.items():
        run, workers_log = slurm.shared / f"run-{name}", slurm.shared / f"workers-{name}"
        job_id = slurm.submit(*TRAIN, "--out", str(run), *extra, workers_log=workers_log)
        submitted[name] = Job(job_id, run, workers_log)
    job_id, run, _ = submitted["requeued"]
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert slurm.job(job_id)["JobState"] in {"PENDING", "RUNNING"}, slurm.output(job_id)
        assert time.monotonic() < deadline, slurm.output(job_id)
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    return submitted


@pytest.mark.parametrize("exchange", ["exact", "collective"])
def test_a_two_node_job_trains_with_one_worker_on_each_node(slurm, jobs, exchange):
    job_id, run, workers_log = jobs[exchange]
    assert_two_node_job_completed(slurm, job_id, workers_log)
    assert json.loads((run / "result.json").read_text())["meta_steps"] == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


# -- `ray job submit` to a two-node Ray cluster ------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(nodes):
    """A Ray head (with the job server) in node 1 and a Ray node in node 2, one CPU each."""
    started = [nodes.start_ray(1, dashboard=True), nodes.start_ray(2)]
    try:
        nodes.wait_for_ray(2)
        probe = ("import time, urllib.request\nend = time.monotonic() + 120\nwhile True:\n"
                 "    try:\n"
                 f"        urllib.request.urlopen('{nodes.dashboard_url()}/api/version', "
                 "timeout=2).read()\n        break\n"
                 "    except OSError:\n"
                 "        if time.monotonic() > end: raise\n        time.sleep(0.5)\n")
        done = nodes.run(1, [sys.executable, "-c", probe], timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        yield nodes
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(60)
        for i in (1, 2):
            nodes.procs.pop(i, None)


def test_ray_job_submit_runs_amfs_train_across_two_nodes(ray_cluster):
    nodes = ray_cluster
    # the run directory: on storage both nodes see (here the machine's file system)
    run = nodes.temp_dir(1) / "run"
    done = nodes.run(1, [netns.RAY, "job", "submit", "--address", nodes.dashboard_url(), "--",
                         sys.executable, "-m", "amfs_dist", *TRAIN, "--out", str(run),
                         "train.steps=3"], timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    result = json.loads((run / "result.json").read_text())
    assert result["meta_steps"] == 3
    probe = WORKER_IPS + "print(json.dumps(ips))\n"
    found = nodes.run(1, [sys.executable, "-c", probe], timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout.strip().splitlines()[-1]) == [nodes.address(1),
                                                                 nodes.address(2)]


# -- last: the requeued job continued while the tests above ran --------------------------------
def test_a_two_node_job_signalled_before_its_time_limit_is_requeued_and_continues(slurm, jobs):
    job_id, run, workers_log = jobs["requeued"]
    log = assert_two_node_job_completed(slurm, job_id, workers_log)
    assert slurm.job(job_id)["Restarts"] == "1", slurm.output(job_id)
    assert "USR1: the time limit is near" in log and f"requeueing job {job_id}" in log
    # the first run stopped at the signal (128 + USR1), the requeued one finished
    assert [json.loads(r)["rc"] for r in workers_log.read_text().splitlines()] == [138, 0]
    # both runs in the accounting (-D: the record of each start, not only the last)
    runs = [r for r in slurm.sacct(job_id, "-D") if r["JobID"] == job_id]
    assert [(r["State"], r["NNodes"]) for r in runs] == [("REQUEUED", "2"), ("COMPLETED", "2")]
    result = json.loads((run / "result.json").read_text())
    assert result["meta_steps"] == REQUEUED_STEPS and result["resumed"] is True
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, REQUEUED_STEPS + 1))
