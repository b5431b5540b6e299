"""Helpers shared by several test modules (fixtures live in conftest.py).

A test module imports from here or from conftest, never from another test module.
"""
from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amfs_dist.config import dump_yaml, load_config
from amfs_dist.data.episodes import ImageSet
from amfs_dist.data.prepare.common import split_list
from amfs_dist.train import Trainer
from conftest import TINY

# -- runs on a few workers: the settings, and what a finished run left --------------------------
STEPS = 5
BASE = TINY + [f"train.steps={STEPS}", "dist.cpus_per_worker=0.5", "train.checkpoint_every=2"]

ATOL = 1e-6  # float32 reductions in batches of another size (vmap over 1, 2 or 4 tasks)


def cfg_of(*extra):
    return load_config(None, BASE + list(extra))


def assert_same_params(a: dict, b: dict, atol: float = ATOL):
    checked = 0
    for name, value in a.items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(value, b[name], atol=atol, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked >= 10


def model_state(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def resume_to_the_end(cmd: list[str], run: Path, env: dict, steps: int, timeout: float) -> dict:
    """`CMD --resume RUN` in a subprocess: it exits 0, says it resumed, reaches `steps`, and
    every step is logged exactly once."""
    done = subprocess.run(cmd + ["--resume", str(run)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resumed"] and result["meta_steps"] == steps
    assert [r["step"] for r in metrics(run)] == list(range(1, steps + 1))
    return result


def assert_whole_queries(accuracy: float, episodes: int, ways: int, queries: int) -> None:
    """`accuracy` is the share of correctly classified queries over `episodes` episodes of
    `ways` x `queries` queries each: a whole number of them (so the evaluation saw every
    query of every episode, and no padded or repeated one)."""
    total = episodes * ways * queries
    correct = accuracy * total
    assert 0 <= correct <= total and abs(correct - round(correct)) < 1e-6 * total, \
        f"accuracy {accuracy} is not k/{total}"


def train_in_process(cfg, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.fit(progress=False)
    finally:
        trainer.close()
    return {k: v.clone() for k, v in trainer.learner.module.state_dict().items()}


def kill_worker_after(backend, step: int, worker: int, killed: list):
    """An on_step callback that SIGKILLs the worker's process once `step` steps are done."""
    def on_step(trainer, row):
        if trainer.step == step:
            pid = backend.worker_pids()[worker]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return on_step


# -- image trees and stores -------------------------------------------------------------------
def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format="PNG")
    return buf.getvalue()


_glyph_rng = np.random.default_rng(0)
GLYPHS = [png(_glyph_rng.random((105, 105)) > 0.3, "1") for _ in range(4)]  # 1-bit, like Omniglot


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def lake_tree(root: Path, per_class: int = 3) -> Path:
    layout = {"images_background": ["Beta", "Alpha", "Gamma"], "images_evaluation": ["Delta"]}
    for folder, alphabets in layout.items():
        for a, alphabet in enumerate(alphabets):
            for c in range(1, 3):
                for k in range(per_class):
                    write(root / folder / alphabet / f"character{c:02d}" / f"{k:02d}.png",
                          GLYPHS[(a + c + k) % len(GLYPHS)])
    return root


def class_marked_set(classes=12, per_class=20, shape=(1, 6, 6), splits=(6, 3, 3)) -> ImageSet:
    """Every image's first pixel is its class index, the rest random: membership is visible."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.integers(0, 256, (len(labels),) + shape, dtype=np.uint8)
    images[:, 0, 0, 0] = labels
    bounds = np.cumsum((0,) + splits)
    return ImageSet(images=images, labels=labels, class_names=[f"c{i:02d}" for i in range(classes)],
                    splits={s: np.arange(bounds[i], bounds[i + 1])
                            for i, s in enumerate(("train", "val", "test"))},
                    groups=[f"g{i // 4}" for i in range(classes)])


# -- processes and sockets, read from /proc (what `ss -ltnp` shows) ----------------------------
def _listening() -> dict[int, tuple[ipaddress._BaseAddress, int]]:
    """socket inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = (ipaddress.ip_address(raw), int(hex_port, 16))
    return found


def listening_sockets(pids) -> list[tuple[int, ipaddress._BaseAddress, int]]:
    table, out = _listening(), []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in table:
                out.append((pid, *table[int(link[8:-1])]))
    return out


def is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # [::ffff:127.0.0.1]
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# -- a `ray start --head` cluster of a test's own (the head_node fixture) -----------------------
def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after "pid (comm)": state ppid pgrp session
                pids.append(int(entry.name))
    return pids


def stop_cluster(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its processes
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    for _ in range(2):
        pids = [p for p in session_pids(proc.pid) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.wait(10)


# -- data sets in their standard layouts (mini-ImageNet CSVs, CUB) ---------------------------
_layout_rng = np.random.default_rng(0)


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def ravi_classes() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split, wnid in split_list("mini_imagenet"):
        out[split].append(wnid)
    return out


def mini_imagenet_tree(root: Path, per_class: int = 2, drop: str | None = None) -> Path:
    for split, wnids in ravi_classes().items():
        rows = ["filename,label"]
        for w in wnids:
            if w == drop:
                continue
            for k in range(per_class):
                name = f"{w}{k:08d}.jpg"
                pixels = _layout_rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                write(root / "images" / name, jpeg(pixels[..., 0] if k == 1 else pixels))
                rows.append(f"{name},{w}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def cub_tree(root: Path, per_class: int = 2, drop: str | None = None) -> Path:
    names = [name for _, name in split_list("cub")]
    classes = [f"{i + 1} {n}" for i, n in enumerate(sorted(names)) if n != drop]
    images, labels, boxes = [], [], []
    image_id = 0
    for i, name in enumerate(sorted(names)):
        if name == drop:
            continue
        for k in range(per_class):
            image_id += 1
            pixels = np.zeros((16, 20, 3), np.uint8)
            pixels[:, 10:] = 255  # right half white: the bounding box
            rel = f"{name}/{name.split('.')[1]}_{k:04d}.jpg"
            write(root / "images" / rel, jpeg(pixels))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {i + 1}")
            boxes.append(f"{image_id} 10.0 0.0 10.0 16.0")
    for file, lines in (("classes.txt", classes), ("images.txt", images),
                        ("image_class_labels.txt", labels), ("bounding_boxes.txt", boxes)):
        (root / file).write_text("\n".join(lines) + "\n")
    return root


# -- what a command left: a fingerprint of a folder's tree -------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> the sha256 of its bytes ("dir" for a folder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "dir" for p in sorted(root.rglob("*"))}


# -- commands in a subprocess, stopped by a signal within a deadline ---------------------------
# Kubernetes and Slurm send SIGKILL 30 s after SIGTERM; a loaded 2-core machine gets some slack
STOP_DEADLINE_S = 60


def amfs_env(**extra) -> dict:
    return dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                            os.environ.get("PYTHONPATH", "")]), **extra)


def start_logged(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log = log_path.open("w")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def wait_until_ready(proc: subprocess.Popen, ready, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "ended before the signal: " + log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "never got ready: " + log_path.read_text()[-3000:]
        time.sleep(0.05)


def stop_within_deadline(proc: subprocess.Popen, signum: int, log_path: Path):
    """Send `signum`; (returncode, output) once it exits, which must be within the deadline."""
    proc.send_signal(signum)
    try:
        rc = proc.wait(STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{signal.Signals(signum).name} unanswered after {STOP_DEADLINE_S} s: "
                    + log_path.read_text()[-3000:])
    return rc, log_path.read_text()


def logged_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return metrics(run) if path.exists() and path.read_text().strip() else []


# -- sweep files for tests ---------------------------------------------------------------------
# Tiny trials: 3-way 1-shot glyphs at 16 px, a width-8 Conv-4, 8 steps, a validation every 2.
TEST_BASE = {
    "data.source": "synthetic", "data.image_size": 16, "data.ways": 3, "data.shots": 1,
    "data.queries": 2, "model.width": 8, "train.meta_batch": 4, "train.steps": 8,
    "train.val_every": 2, "train.val_episodes": 3, "train.checkpoint_every": 2,
    "eval.episodes": 6, "eval.queries": 2, "eval.batch": 3, "train.device": "cpu",
}
TEST_SEARCH = {
    "kernel.bandwidth": {"loguniform": [0.001, 3.0]},
    "kernel.lam": {"loguniform": [0.01, 1.0]},
    "kernel.mu": {"uniform": [0.0, 0.1]},
    "kernel.gamma": {"uniform": [0.0, 0.05]},
}
GOOD = {"kernel.bandwidth": 1.0, "kernel.lam": 0.1, "kernel.mu": 0.05, "kernel.gamma": 0.01}


def write_sweep(path: Path, base=None, search=None, **settings) -> Path:
    sweep = {"name": "test", "num_samples": 4, "max_concurrent_trials": 2, "seed": 0,
             "grace_period": 1, "reduction_factor": 2, "startup_trials": 2, "test_episodes": 6}
    sweep.update(settings)
    path.write_text(dump_yaml({"base": {**TEST_BASE, **(base or {})},
                                    "search": search or TEST_SEARCH, "sweep": sweep}))
    return path


def read_csv_rows(path: Path) -> list[dict]:
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def signal_when_ready(cmd: list[str], log_path: Path, env: dict, ready, signum: int,
                      timeout: float = 180, settle: float = 0.0):
    """Start `cmd`, wait until `ready()` (then `settle` seconds more), send `signum`;
    (returncode, output) once it exits, which must be within STOP_DEADLINE_S."""
    proc = start_logged(cmd, log_path, env)
    try:
        wait_until_ready(proc, ready, log_path, timeout)
        time.sleep(settle)
        return stop_within_deadline(proc, signum, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
