"""cluster/slurm/amfs-ray.sbatch without a Slurm: stand-ins for scontrol, squeue and srun on
PATH (the real one-node Slurm runs in tests/test_slurm.py where slurm-wlm is installed)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "amfs-ray.sbatch"
STUBS = {
    "scontrol": '[ "$1" = show ] && [ "$2" = hostnames ] && echo node1\nexit 0\n',
    "squeue": 'case "$*" in *%L*) echo "$FAKE_TIME_LEFT" ;; esac\nexit 0\n',
    "srun": "exit 1\n",  # the Ray head never starts: the job fails fast after its checks
}


@pytest.mark.parametrize("time_left,warned", [("00:06:00", True), ("1-00:00:00", False),
                                              ("UNLIMITED", False)])
def test_a_time_limit_that_leaves_usr1_before_ray_is_up_is_warned_about(time_left, warned,
                                                                        tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_JOB_NUM_NODES="1",
               FAKE_TIME_LEFT=time_left, AMFS_RAY_TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(SCRIPT), "train"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "did not start" in done.stderr, done.stderr
    warning = ("amfs-ray: warning: this job has 360 s left; USR1 comes 300 s before the end, "
               "which may be before Ray is up (up to 300 s)")
    assert (warning in done.stderr) == warned, done.stderr
