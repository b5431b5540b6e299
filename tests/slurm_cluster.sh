#!/usr/bin/env bash
# A private one-node Slurm for the tests: this host with its real CPUs and memory, its own
# munge key and socket, its own ports, state and logs, all under DIR (keep it short: unix
# socket paths are limited to 107 bytes).
#
#   tests/slurm_cluster.sh start DIR   # prints the slurm.conf path; clients need SLURM_CONF=it
#   tests/slurm_cluster.sh stop DIR    # stops the three daemons it started, by their pid files
#
# Needs root, munged, slurmctld and slurmd (Debian: apt-get install slurm-wlm munge).
# proctrack/linuxproc and task/none work without cgroups (containers).
# cred_expire=5 (Slurm's least): a requeued job may start again 6 s after its requeue, not 121 s;
# the hold is what keeps its new launch clear of the old one's revoked credential. sched_interval=2
# and bf_interval=2 let the schedulers start it within 2 s of the hold's end, not up to 60.
set -euo pipefail

cmd="${1:?usage: $0 start|stop DIR}"
dir="$(realpath -m "${2:?usage: $0 start|stop DIR}")"

stop() {
    for daemon in slurmd slurmctld munged; do
        if [[ -s "$dir/$daemon.pid" ]]; then
            pid="$(cat "$dir/$daemon.pid")"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -KILL "$pid" 2>/dev/null || true
            rm -f "$dir/$daemon.pid"
        fi
    done
}

free_ports() {  # two free TCP ports on this host
    python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

start() {
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    # munge: a key of our own, a socket of our own; nothing of the system's is touched
    head -c 1024 /dev/urandom > "$dir/munge.key"
    chmod 400 "$dir/munge.key"
    munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed"

    read -r ctld_port slurmd_port < <(free_ports)
    node="$(slurmd -C | head -1)"  # NodeName=HOST CPUs=... RealMemory=...: this host as it is
    cat > "$dir/slurm.conf" <<EOF
ClusterName=amfs-test
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    export SLURM_CONF="$dir/slurm.conf"
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "$dir/slurm.conf"
            return 0
        fi
        sleep 1
    done
    echo "slurm_cluster.sh: the node did not become idle in 60 s:" >&2
    sinfo >&2 || true
    tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop
    return 1
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
