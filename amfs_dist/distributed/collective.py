"""dist.exchange=collective: the workers exchange gradients among themselves, as DDP does.

Every worker holds a replica of the parameters and the Adam state. Each step:

1. `compute`: each worker draws its tasks (round robin, as in RayBackend) and computes their
   meta-gradients [t, P] from its own replica; it sends the driver per-task loss/accuracy/
   finite flags and what the weights need:
   - dist.weights_from=sketch: the tasks' count sketches [t, d];
   - dist.weights_from=exact: the Gram matrix. The parameters are cut into blocks of
     dist.block_size coordinates and each worker owns a contiguous run of blocks; one
     all-to-all gives it every task's gradient on its own coordinates ([T, its share]; each
     worker sends and receives about t x P floats: the exact Gram matrix needs every pair of
     rows to meet somewhere), and it computes one float64 T x T Gram matrix per block. An
     all-reduce sums them and worker 0 sends the driver the T x T result; with
     train.deterministic every worker sends its blocks' matrices and the driver adds them in
     block order (T x T x P / block floats, still not T x P).
2. The driver computes the O-AMFS weights (or the mean) with the trainer's `weigh` and sends
   every worker the T weights.
3. `update`: the workers form G = sum_i w_i g_i among themselves, and each applies the same
   Adam step to its replica:
   - on coordinate shares (after the all-to-all, i.e. with exact weights or
     train.deterministic): each adds its share over all T tasks in task order and one
     all-gather assembles G; no float is ever summed across workers, so G's bits do not
     depend on the worker count;
   - else (sketch weights): each adds its own tasks and one all-reduce (about 2P floats per
     worker) sums the workers' parts.

The driver never holds a P-sized tensor except when it fetches the state (`state`) from one
worker to checkpoint, validate or finish, and when it gives the workers the state to start
from (`load_state`).

Why a torch.distributed process group of our own, not ray.util.collective: in Ray 2.60 its
GLOO backend (TorchGLOOGroup) is torch.distributed gloo underneath, but it initialises the
process's default group once, from Ray's internal KV store, and never passes a timeout to it
(`gloo_timeout` only bounds the rendezvous): a collective call with a lost peer would wait
torch's default 30 minutes, and the group could not be rebuilt in the surviving processes.
Here worker 0 opens a TCPStore, and every worker calls init_process_group(store, timeout=
dist.timeout_s); a rebuild is destroy + init on a fresh store. The backend is gloo on the
CPU and nccl on CUDA (same calls; nccl honours the timeout through torch's asynchronous
error handling, on by default).
Each worker advertises the address of its interface that routes to worker 0's node
(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless set in its environment), not the address its
hostname resolves to, which is loopback on Debian-style hosts.

Faults: a worker that dies or hangs makes its peers' collective calls fail (at once for a
closed connection, after dist.timeout_s for a silent peer); they answer "peer lost" instead
of raising. A worker silent for 2 x dist.timeout_s counts as hung. The driver replaces the lost workers (dist.max_worker_restarts, as RayBackend),
rebuilds the group, gives every worker the state of a surviving replica (through the object
store, not the driver) and recomputes the step. With no survivor (W = 1) the replicas start
from the last state the driver handed out or fetched, and the steps since are replayed:
episodes and updates depend on (parameters, step, task ids) only, so the numbers are those
of an uninterrupted run.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import psutil
import torch
import torch.distributed as tdist

from amfs_dist.algorithms.outer import block_grams, combine
from amfs_dist.backend import StepResult, Weigh, apply_direction, finite_rows, zero_bad_rows
from amfs_dist.distributed.backend import RayBackend, _first_lines, shard
from amfs_dist.distributed.worker import ShardWorker, _to_numpy
from amfs_dist.errors import WorkerFailedError

log = logging.getLogger("amfs_dist.distributed")


def shares(size: int, block: int, workers: int) -> list[int]:
    """Coordinate bounds [b_0 = 0, ..., b_W = size]: worker w owns [b_w, b_w+1), whole blocks."""
    blocks = -(-size // block)
    return [min(size, block * (blocks * w // workers)) for w in range(workers + 1)]


def tasks_of(T: int, workers: int) -> list[int]:
    """How many of the T tasks each worker gets (round robin)."""
    return [len(range(w, T, workers)) for w in range(workers)]


SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def route_to(host: str, port: int) -> tuple[str, str]:
    """(address, interface) of this machine that packets to host:port leave from: what a peer
    can reach this process at when the rendezvous host is reachable. A connected UDP socket
    sends nothing; the kernel only picks the route."""
    family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(target)
        address = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return address, name
    raise RuntimeError(f"no network interface holds {address}, the address this machine "
                       f"reaches the rendezvous host {host} from")


class CollectiveWorker(ShardWorker):
    """A shard worker with a replica of the parameters and the Adam state, in a process group."""

    def __init__(self, cfg_values: dict, index: int, source_factory=None):
        super().__init__(cfg_values, index, source_factory)
        self.learner = self.backend.learner
        self.optimizer = torch.optim.Adam(self.learner.params().values(), lr=self.cfg.train.lr)
        self.world = self.cfg.dist.workers
        self.by_shares = self.cfg.dist.weights_from == "exact" or self.cfg.train.deterministic
        self.bounds = shares(self.num_params, self.cfg.dist.block_size, self.world)
        self.at_step: int | None = None  # the step the replica's parameters are at
        self._store = None
        self._step_data = None           # phase 1 -> phase 2 of one step
        # set by the user (the raylet's environment): they win over the route to the host
        self._user_ifnames = {k for k in SOCKET_IFNAMES if os.environ.get(k)}

    # -- the group ---------------------------------------------------------------------------------
    def _timeout(self) -> timedelta:
        return timedelta(seconds=self.cfg.dist.timeout_s)

    def open_store(self, host: str) -> int:
        """Worker 0: a fresh TCPStore for the next group; returns its port."""
        self._store = tdist.TCPStore(host, 0, self.world, is_master=True, timeout=self._timeout(),
                                     wait_for_workers=False)
        return self._store.port

    def join(self, host: str, port: int, generation: int) -> bool:
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except Exception:  # a broken group may fail to say goodbye: it is dropped anyway
                pass
        store = self._store if self.index == 0 else tdist.TCPStore(
            host, port, self.world, is_master=False, timeout=self._timeout())
        self._advertise_route_to(host, port)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        tdist.init_process_group(backend, store=tdist.PrefixStore(f"g{generation}", store),
                                 rank=self.index, world_size=self.world, timeout=self._timeout())
        return True

    def _advertise_route_to(self, host: str, port: int) -> None:
        """gloo and NCCL advertise the address the hostname resolves to, which is loopback where
        /etc/hosts maps it to 127.0.1.1 (Debian, Ubuntu, hostNetwork pods): peers on other
        nodes then connect to themselves. Name them the interface that routes to the host."""
        address, interface = route_to(host, port)
        for key in SOCKET_IFNAMES:
            if key not in self._user_ifnames:
                os.environ[key] = interface
        log.info("collective worker %d advertises %s (%s)", self.index, address,
                 ", ".join(f"{k}={os.environ[k]}" for k in SOCKET_IFNAMES))

    # -- the replica's state ----------------------------------------------------------------------
    def load_state(self, state: dict) -> int:
        self.learner.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.at_step = int(state["step"])
        self._step_data = None
        return self.at_step

    def state(self) -> dict:
        cpu = lambda x: x.detach().cpu() if torch.is_tensor(x) else x
        opt = self.optimizer.state_dict()
        opt["state"] = {k: {n: cpu(v) for n, v in s.items()} for k, s in opt["state"].items()}
        return {"model": {k: cpu(v) for k, v in self.learner.module.state_dict().items()},
                "optimizer": opt, "step": self.at_step}

    def replica_step(self) -> int | None:
        return self.at_step

    # -- one step ---------------------------------------------------------------------------------
    def compute(self, step: int, task_ids: list[int], T: int) -> dict:
        """Phase 1: this worker's tasks' loss/acc/finite and their sketches [t, d] or the
        float64 Gram matrices [blocks, T, T] of its coordinate share; or {"peer_lost": why}."""
        if step != self.at_step:
            raise RuntimeError(f"asked for step {step}, but the replica is at step {self.at_step}")
        self._step_data = None
        if task_ids:
            tg, timings = self.backend.task_gradients(self.learner.flat_params(), step, task_ids)
            finite = finite_rows(tg)
            rows, loss, acc = zero_bad_rows(tg.grads, finite), tg.loss, tg.acc
        else:  # more workers than tasks: this one only takes part in the collectives
            rows = torch.zeros(0, self.num_params, device=self.device)
            finite, loss, acc = (torch.zeros(0, dtype=dt, device=self.device)
                                 for dt in (torch.bool, torch.float32, torch.float32))
            timings = {"sampling_s": 0.0, "sampling_wait_s": 0.0, "compute_s": 0.0}
        t0 = time.perf_counter()
        out = {"loss": _to_numpy(loss), "acc": _to_numpy(acc), "finite": _to_numpy(finite)}
        if self.cfg.dist.weights_from == "sketch":
            out["sketches"] = _to_numpy(self._sketcher()(rows))  # bad rows are zero already
        timings["compute_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        sent = 0
        if self.by_shares:
            try:
                rows, sent = self._to_shares(rows, T)
            except RuntimeError as err:  # gloo/nccl: a peer died, hung or left the group
                return {"peer_lost": _first_lines(err, 3)}
        comm = time.perf_counter() - t1
        t2 = time.perf_counter()
        if self.cfg.dist.weights_from == "exact":
            grams = block_grams(rows, self.cfg.dist.block_size)
            grams = (torch.stack(grams) if grams
                     else torch.zeros(0, T, T, dtype=torch.float64, device=rows.device))
            if not self.cfg.train.deterministic:  # one T x T matrix to the driver, from worker 0
                t3 = time.perf_counter()
                try:
                    grams = self._summed(grams.sum(0, keepdim=True))
                except RuntimeError as err:
                    return {"peer_lost": _first_lines(err, 3)}
                comm += time.perf_counter() - t3
                sent += int(2 * (self.world - 1) / self.world * grams[0].nbytes)
                grams = grams if self.index == 0 else grams[:0]
            out["grams"] = _to_numpy(grams)
        timings["compute_s"] += time.perf_counter() - t2
        self._step_data = (step, rows)
        out.update(timings=timings, comm_s=comm, sent_bytes=sent)
        return out

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tdist.all_reduce(t)
        return t

    def _to_shares(self, rows: torch.Tensor, T: int) -> tuple[torch.Tensor, int]:
        """All-to-all: [my tasks, P] -> [T, my coordinate share], rows in task order."""
        b, W, me = self.bounds, self.world, self.index
        if W == 1:  # nothing to exchange (and no copies of [T, P])
            return rows, 0
        counts = tasks_of(T, W)
        send = torch.cat([rows[:, b[v]:b[v + 1]].reshape(-1) for v in range(W)])
        mine = b[me + 1] - b[me]
        recv = torch.empty(T * mine, dtype=rows.dtype, device=rows.device)
        tdist.all_to_all_single(recv, send, output_split_sizes=[c * mine for c in counts],
                                input_split_sizes=[rows.shape[0] * (b[v + 1] - b[v])
                                                   for v in range(W)])
        out = torch.empty(T, mine, dtype=rows.dtype, device=rows.device)
        for u, piece in enumerate(recv.split([c * mine for c in counts])):
            out[u::W] = piece.view(counts[u], mine)
        sent = rows.element_size() * rows.shape[0] * (self.num_params - mine)
        return out, sent

    def update(self, step: int, weights, finite) -> dict:
        """Phase 2: G = sum_i w_i g_i among the workers, then this replica's Adam step.
        weights: [T] float32 (None: no finite task, the step is skipped); finite: [T] bool."""
        t0 = time.perf_counter()
        if self._step_data is None or self._step_data[0] != step:
            raise RuntimeError(f"update for step {step} without its gradients")
        _, rows = self._step_data
        if weights is None:
            self._step_data = None
            self.at_step += 1
            return {"timings": {"compute_s": 0.0}, "comm_s": 0.0, "sent_bytes": 0}
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)
        good = torch.tensor(finite, device=self.device)
        if not self.by_shares:  # this worker's own tasks only
            mine = slice(self.index, len(good), self.world)
            w, good = w[mine], good[mine]
        ordered = self.cfg.train.deterministic
        part = (combine(rows[good], w[good], ordered) if bool(good.any())
                else torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device))
        compute = time.perf_counter() - t0
        t1 = time.perf_counter()
        try:
            direction, sent = self._assemble(part)
        except RuntimeError as err:
            return {"peer_lost": _first_lines(err, 3)}
        comm = time.perf_counter() - t1
        t2 = time.perf_counter()
        apply_direction(self.learner, self.optimizer, direction)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step_data = None
        self.at_step += 1
        return {"timings": {"compute_s": compute + time.perf_counter() - t2}, "comm_s": comm,
                "sent_bytes": sent}

    def _assemble(self, part: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The full G [P] on every worker, and the bytes this worker sent for it (ring)."""
        W, nbytes = self.world, part.element_size()
        if W == 1:
            return part, 0
        if not self.by_shares:
            tdist.all_reduce(part)
            return part, int(2 * (W - 1) / W * self.num_params * nbytes)
        b = self.bounds
        widest = max(b[v + 1] - b[v] for v in range(W))
        padded = torch.zeros(widest, dtype=part.dtype, device=part.device)
        padded[:part.numel()] = part
        gathered = [torch.empty_like(padded) for _ in range(W)]
        tdist.all_gather(gathered, padded)
        direction = torch.cat([g[:b[v + 1] - b[v]] for v, g in enumerate(gathered)])
        return direction, (W - 1) * widest * nbytes


class _GroupBroken(Exception):
    def __init__(self, lost: dict[int, str], peers: dict[int, str]):
        super().__init__(f"lost {lost}, peers {peers}")
        self.lost, self.peers = lost, peers


class CollectiveBackend(RayBackend):
    """The driver's side: weights from sketches or the Gram matrix, updates on the workers."""

    worker_class = CollectiveWorker
    owns_update = True
    elastic_exchange = False  # the group and the coordinate shares are made for dist.workers

    def __init__(self, cfg, source_factory=None):
        super().__init__(cfg, source_factory)
        self.generation = 0
        self._fallback = None  # (ObjectRef of a state, its step): for when no replica survives
        self._failures = 0     # group failures in a row with no worker lost
        self._at_step = None
        try:
            self._recover({}, initial=True)
        except BaseException:
            self.close()
            raise

    # -- rounds of calls ---------------------------------------------------------------------------
    def _deadline(self, w: int) -> float:
        """Twice dist.timeout_s: a worker waiting in a collective call for a hung peer answers
        "peer lost" after dist.timeout_s of waiting, which may begin up to one step's compute
        (at most dist.timeout_s) after the call; only a worker silent for longer is hung."""
        return super()._deadline(w) + self.timeout

    def _calls(self, calls: dict, what: str, work: bool = False) -> dict:
        """Run calls[w]() on each worker; raise _GroupBroken naming the workers lost (dead or
        silent past their deadline) and those whose collective call failed (peer lost)."""
        pending = {call(): (w, self._deadline(w)) for w, call in calls.items()}
        results, lost, peers = {}, {}, {}
        for w, out, why in self._answers(pending, what):
            if why:
                lost[w] = why
            elif isinstance(out, dict) and "peer_lost" in out:
                peers[w] = out["peer_lost"]
            else:
                results[w] = out
                if work:
                    self._fresh[w] = False
        if lost or peers:
            raise _GroupBroken(lost, peers)
        return results

    def _all(self, method: str, *args, what: str, work: bool = False) -> dict:
        return self._calls({w: (lambda w=w: getattr(self.workers[w], method).remote(*args))
                            for w in range(self.num_workers)}, what, work)

    # -- recovery ----------------------------------------------------------------------------------
    def _recover(self, lost: dict[int, str], initial: bool = False) -> None:
        """Replace the lost workers, rebuild the group, and give every replica the state of a
        survivor (or the fallback state). Leaves self._at_step at the replicas' step."""
        replaced: set[int] = set()
        while True:
            for w, why in lost.items():
                self._replace(w, why)  # raises WorkerFailedError past dist.max_worker_restarts
                replaced.add(w)
            try:
                self._build_group()
                if not initial:
                    self._sync_state(replaced)
                return
            except _GroupBroken as broken:
                lost = broken.lost
                if not lost:
                    self._count_failure(broken)

    def _count_failure(self, broken: _GroupBroken) -> None:
        self._failures += 1
        if self._failures > self.max_restarts:
            raise WorkerFailedError(
                f"the workers' collective group failed {self._failures} times in a row with no "
                f"worker lost (more than dist.max_worker_restarts={self.max_restarts}): "
                f"{next(iter(broken.peers.values()), '')}")

    def _build_group(self) -> None:
        info = self._all("info", what="info")
        self.info.update(info)
        nodes = {i["node_id"] for i in info.values()}
        host = "127.0.0.1" if len(nodes) == 1 else info[0]["ip"]
        self.generation += 1
        port = self._calls({0: lambda: self.workers[0].open_store.remote(host)}, "open store")[0]
        self._all("join", host, port, self.generation, what="join the group")

    def _sync_state(self, replaced: set[int]) -> None:
        steps = self._all("replica_step", what="replica step")
        survivors = {w: s for w, s in steps.items() if w not in replaced and s is not None}
        if survivors:
            src = max(survivors, key=lambda w: survivors[w])
            at = survivors[src]
            ref = self.workers[src].state.remote()  # worker to workers: never through here
        elif self._fallback is not None:
            ref, at = self._fallback
        else:
            raise WorkerFailedError("no shard worker holds the parameters and no state to "
                                    "restart from was kept")
        self._calls({w: (lambda w=w: self.workers[w].load_state.remote(ref))
                     for w, s in steps.items() if s != at or w in replaced}, "load state")
        self._at_step = at

    # -- the trainer's interface -------------------------------------------------------------------
    def load_state(self, state: dict) -> None:
        ref = self._ray.put(state)
        self._all("load_state", ref, what="load state")
        self._fallback, self._at_step = (ref, int(state["step"])), int(state["step"])

    def state(self) -> dict:
        ref = self.workers[0].state.remote()  # every replica holds the same state
        state = self._ray.get(ref, timeout=self.timeout)
        self._fallback = (ref, int(state["step"]))  # stays in the object store
        return state

    def step(self, step: int, task_ids: Sequence[int], weigh: Weigh) -> StepResult:
        while True:
            if self._at_step is not None and self._at_step < step:  # after a restart: replay
                log.warning("replaying steps %d..%d from the last state", self._at_step, step - 1)
                try:
                    self._step(self._at_step, task_ids, weigh)
                except _GroupBroken as broken:
                    self._handle(broken)
                continue
            if self._at_step == step + 1 and self._done is not None:  # it completed after all
                return self._done
            try:
                return self._step(step, task_ids, weigh)
            except _GroupBroken as broken:
                self._handle(broken)

    def _handle(self, broken: _GroupBroken) -> None:
        log.warning("collective step failed: lost %s, peer errors %s; rebuilding the group",
                    broken.lost, broken.peers)
        if not broken.lost:
            self._count_failure(broken)
        self._recover(broken.lost)

    _done: StepResult | None = None

    def _step(self, step: int, task_ids: Sequence[int], weigh: Weigh) -> StepResult:
        T, W = len(task_ids), self.num_workers
        shards = shard(task_ids, W)
        self._done = None
        t0 = time.perf_counter()
        out = self._calls({w: (lambda w=w: self.workers[w].compute.remote(step, shards[w], T))
                           for w in range(W)}, f"compute step {step}", work=True)
        gather1 = time.perf_counter() - t0
        loss, acc = np.empty(T, np.float32), np.empty(T, np.float32)
        finite = np.empty(T, bool)
        received = 0
        for w, o in out.items():
            loss[w::W], acc[w::W], finite[w::W] = o["loss"], o["acc"], o["finite"]
            received += o["loss"].nbytes + o["acc"].nbytes + o["finite"].nbytes
        t1 = time.perf_counter()
        if self.cfg.dist.weights_from == "sketch":
            vectors = np.empty((T, self.cfg.dist.sketch_dim), np.float32)
            for w, o in out.items():
                vectors[w::W] = o["sketches"]
                received += o["sketches"].nbytes
            finite &= np.isfinite(vectors).all(1)
        else:
            gram = torch.zeros(T, T, dtype=torch.float64)
            for w in range(W):  # workers own consecutive blocks: this is block order
                received += out[w]["grams"].nbytes
                for part in torch.tensor(out[w]["grams"]):
                    gram += part
        weights, full = None, np.zeros(T, np.float32)
        if finite.any():
            keep = torch.from_numpy(finite)
            if self.cfg.dist.weights_from == "sketch":
                weights = weigh(torch.from_numpy(vectors[finite]))
            else:
                weights = weigh(None, gram=gram[keep][:, keep])
            full[finite] = weights.weights.detach().cpu().float().numpy()
        weighting = time.perf_counter() - t1
        result = StepResult(None, torch.from_numpy(loss), torch.from_numpy(acc),
                            torch.from_numpy(finite), weights, updated=weights is not None)
        self._done = result
        t2 = time.perf_counter()
        sums = self._calls({w: (lambda w=w: self.workers[w].update.remote(
            step, full if weights is not None else None, finite)) for w in range(W)},
            f"update step {step}")
        gather2 = time.perf_counter() - t2
        self._at_step, self._failures = step + 1, 0
        sent = (full.nbytes + finite.nbytes) * W
        timings = self._timings(gather1 + gather2, [[o["timings"] for o in out.values()],
                                                    [o["timings"] for o in sums.values()]])
        timings.update(
            weighting_s=weighting, exchange_bytes=received + sent,
            collective_s=max(out[w]["comm_s"] + sums[w]["comm_s"] for w in range(W)),
            worker_bytes=max(out[w]["sent_bytes"] + sums[w]["sent_bytes"] for w in range(W)))
        result.timings = timings
        return result
