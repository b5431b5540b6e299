"""dist.exchange=collective: the exchange inside each rank of Ray Train's worker group.

Ray Train (distributed.raytrain) starts the ranks, sets up torch.distributed among them (gloo
on the CPU, NCCL on GPUs) and restarts them after a failure; every rank runs the trainer's
step loop on its own replica of the parameters and the Adam state. This module is that
loop's exchange. Each step:

1. Each rank draws its tasks (round robin by task id, as every exchange does) and computes
   their meta-gradients [t, P] from its replica.
2. What the weights need reaches rank 0, which plays the driver:
   - dist.weights_from=sketch: the tasks' count sketches [t, d], with per-task loss,
     accuracy and finite flags, in one all-gather;
   - dist.weights_from=exact: the Gram matrix. The parameters are cut into blocks of
     dist.block_size coordinates and each rank owns a contiguous run of blocks; one
     all-to-all gives it every task's gradient on its own coordinates ([T, its share]: the
     exact Gram matrix needs every pair of rows to meet somewhere) and it computes one
     float64 T x T Gram matrix per block; an all-reduce sums them (train.deterministic: an
     all-gather, and rank 0 adds them in block order).
3. Rank 0 computes the O-AMFS weights (or the mean) with the trainer's `weigh` and
   broadcasts the T weights.
4. G = sum_i w_i g_i among the ranks, and every rank's trainer applies the same Adam step:
   - on coordinate shares (exact weights, or train.deterministic): each rank adds its share
     over all T tasks in task order and one all-gather assembles G; no float is summed
     across ranks, so G's bits do not depend on the worker count;
   - else (sketch weights): each rank adds its own tasks and one all-reduce sums the parts.

Nothing of size P reaches the `amfs train` process but the checkpoints and the final model.
Validation and test episodes are sharded over the ranks by batch of episodes.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

import psutil
import torch
import torch.distributed as tdist

from amfs_dist.algorithms.outer import block_grams, combine
from amfs_dist.backend import (
    InProcessBackend,
    StepResult,
    Weigh,
    finite_rows,
    finite_weights,
    in_task_order,
    zero_bad_rows,
)
from amfs_dist.config import Config
from amfs_dist.distributed.backend import shard
from amfs_dist.distributed.sketch import CountSketch

SOCKET_IFNAMES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def shares(size: int, block: int, workers: int) -> list[int]:
    """Coordinate bounds [b_0 = 0, ..., b_W = size]: worker w owns [b_w, b_w+1), whole blocks."""
    blocks = -(-size // block)
    return [min(size, block * (blocks * w // workers)) for w in range(workers + 1)]


def tasks_of(T: int, workers: int) -> list[int]:
    """How many of the T tasks each worker gets (round robin)."""
    return [len(range(w, T, workers)) for w in range(workers)]


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


def advertise_route_to(host: str, port: int, user_set: Sequence[str] = ()) -> str:
    """gloo and NCCL advertise the address the hostname resolves to, which is loopback where
    /etc/hosts maps it to 127.0.1.1 (Debian, Ubuntu, hostNetwork pods): peers on other nodes
    then connect to themselves. Name them the interface that routes to the rendezvous host,
    unless the user set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (`user_set`). Returns the
    address advertised."""
    address, interface = route_to(host, port)
    for key in SOCKET_IFNAMES:
        if key not in user_set:
            os.environ[key] = interface
    return address


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:len(t)] = t
    return out


class CollectiveExchange:
    """The exchange of one rank; torch.distributed's default group is Ray Train's."""

    def __init__(self, cfg: Config, local: InProcessBackend):
        self.cfg, self.local = cfg, local
        self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        self.device = local.learner.device
        self.num_params = local.learner.layout.size
        self.by_shares = cfg.dist.weights_from == "exact" or cfg.train.deterministic
        self.bounds = shares(self.num_params, cfg.dist.block_size, self.world)
        self._sketch: CountSketch | None = None
        # rank 0 sets it to stop the run after this step; the weights' broadcast carries it to
        # every rank (no collective call of its own), where it reads the same after the step
        self.stop = False

    @property
    def source(self):
        return self.local.source

    # -- one step ---------------------------------------------------------------------------------
    def direction(self, flat_params: torch.Tensor, step: int, task_ids: Sequence[int],
                  weigh: Weigh) -> StepResult:
        T, W, me = len(task_ids), self.world, self.rank
        mine = shard(task_ids, W)[me]
        if mine:
            tg, timings = self.local.task_gradients(flat_params, step, mine)
            finite = finite_rows(tg)
            rows, loss, acc = zero_bad_rows(tg.grads, finite), tg.loss, tg.acc
        else:  # more ranks than tasks: this one only takes part in the collectives
            rows = torch.zeros(0, self.num_params, device=self.device)
            finite, loss, acc = (torch.zeros(0, dtype=dt, device=self.device)
                                 for dt in (torch.bool, torch.float32, torch.float32))
            timings = {"sampling_s": 0.0, "sampling_wait_s": 0.0, "compute_s": 0.0}
        comm, sent = 0.0, 0
        sketch = self.cfg.dist.weights_from == "sketch"

        # per-task loss, accuracy, finite (and sketches) of every rank, in task order
        t0 = time.perf_counter()
        per_task = torch.stack([loss.float(), acc.float(), finite.float()], 1)
        if sketch:
            per_task = torch.cat([per_task, self._sketcher()(rows)], 1)  # bad rows are zero
        timings["compute_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        widest = -(-T // W)
        gathered = [torch.empty(widest, per_task.shape[1], device=self.device)
                    for _ in range(W)]
        tdist.all_gather(gathered, _padded(per_task, widest))
        counts = tasks_of(T, W)
        everyone = in_task_order([g[:c] for g, c in zip(gathered, counts)], T).cpu()
        loss, acc, finite = everyone[:, 0], everyone[:, 1], everyone[:, 2].bool()
        sent += per_task.nbytes * (W - 1)
        if self.by_shares:
            rows, moved = self._to_shares(rows, T)
            sent += moved
        comm += time.perf_counter() - t1

        # rank 0 weighs and broadcasts the T weights
        t2 = time.perf_counter()
        weights, full = None, torch.zeros(T, dtype=torch.float32)
        gram_bytes = 0
        if sketch:
            vectors = everyone[:, 3:]
            finite &= torch.isfinite(vectors).all(1)
            if me == 0:
                weights, full = finite_weights(finite, weigh, vectors)
        else:
            gram, gram_bytes, gram_comm = self._gram(rows, T)
            sent, comm = sent + gram_bytes, comm + gram_comm
            if me == 0:
                weights, full = finite_weights(finite, weigh, gram=gram.cpu())
        weighting = time.perf_counter() - t2
        t3 = time.perf_counter()
        message = torch.cat([full, torch.tensor([float(self.stop)])]).to(self.device)
        if W > 1:
            tdist.broadcast(message, 0)
        full, self.stop = message[:T], bool(message[T] > 0)
        comm += time.perf_counter() - t3
        direction = None
        if bool(finite.any()):
            direction, moved, assemble = self._assemble(rows, full, finite)
            sent, comm = sent + moved, comm + assemble
        # exchange_bytes: what reaches rank 0 for the weights and leaves it with them, as the
        # driver's traffic of the other exchanges (the rest is worker_bytes, the busiest rank's)
        driver = (W - 1) * widest * per_task.shape[1] * 4 + (W - 1) * (T + 1) * 4 + gram_bytes
        timings.update(weighting_s=weighting, collective_s=comm, worker_bytes=sent,
                       exchange_bytes=driver, transfer_s=comm, workers=W)
        return StepResult(direction, loss, acc, finite, weights, timings)

    def _sketcher(self) -> CountSketch:
        if self._sketch is None:
            self._sketch = CountSketch(self.num_params, self.cfg.dist.sketch_dim, self.cfg.seed,
                                       self.device)
        return self._sketch

    def _to_shares(self, rows: torch.Tensor, T: int) -> tuple[torch.Tensor, int]:
        """All-to-all: [my tasks, P] -> [T, my coordinate share], rows in task order."""
        b, W, me = self.bounds, self.world, self.rank
        if W == 1:  # nothing to exchange (and no copies of [T, P])
            return rows, 0
        counts = tasks_of(T, W)
        send = torch.cat([rows[:, b[v]:b[v + 1]].reshape(-1) for v in range(W)])
        mine = b[me + 1] - b[me]
        recv = torch.empty(T * mine, dtype=rows.dtype, device=rows.device)
        tdist.all_to_all_single(recv, send, output_split_sizes=[c * mine for c in counts],
                                input_split_sizes=[rows.shape[0] * (b[v + 1] - b[v])
                                                   for v in range(W)])
        parts = [piece.view(c, mine) for piece, c in zip(recv.split([c * mine for c in counts]),
                                                         counts)]
        sent = rows.element_size() * rows.shape[0] * (self.num_params - mine)
        return in_task_order(parts, T), sent

    def _gram(self, rows: torch.Tensor, T: int) -> tuple[torch.Tensor, int, float]:
        """The float64 T x T Gram matrix of all tasks' rows (on rank 0; the others get a
        partial one they do not use), from this rank's coordinate share; bytes sent, seconds
        in collectives."""
        grams = block_grams(rows, self.cfg.dist.block_size)
        W = self.world
        t0 = time.perf_counter()
        if not self.cfg.train.deterministic:
            total = (torch.stack(grams).sum(0) if grams
                     else torch.zeros(T, T, dtype=torch.float64, device=rows.device))
            if W > 1:
                tdist.all_reduce(total)
            return total, int(2 * (W - 1) / W * total.nbytes), time.perf_counter() - t0
        # block order, whatever the worker count: gather every rank's blocks
        b, block = self.bounds, self.cfg.dist.block_size
        counts = [-(-(b[v + 1] - b[v]) // block) for v in range(W)]
        mine = (torch.stack(grams) if grams
                else torch.zeros(0, T, T, dtype=torch.float64, device=rows.device))
        if W > 1:
            widest = max(counts)
            gathered = [torch.empty(widest, T, T, dtype=torch.float64, device=rows.device)
                        for _ in range(W)]
            tdist.all_gather(gathered, _padded(mine, widest))
            mine = torch.cat([g[:c] for g, c in zip(gathered, counts)])
        total = torch.zeros(T, T, dtype=torch.float64, device=rows.device)
        for part in mine:
            total += part
        sent = int((W - 1) * max(counts) * T * T * 8)
        return total, sent, time.perf_counter() - t0

    def _assemble(self, rows: torch.Tensor, full: torch.Tensor, finite: torch.Tensor
                  ) -> tuple[torch.Tensor, int, float]:
        """G [P] on every rank; bytes sent, seconds in collectives."""
        W, me = self.world, self.rank
        good = finite.to(self.device)
        w = full
        if not self.by_shares:  # this rank's own tasks only
            w, good = w[me::W], good[me::W]
        part = (combine(rows[good], w[good], self.cfg.train.deterministic) if bool(good.any())
                else torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device))
        if W == 1:
            return part, 0, 0.0
        t0 = time.perf_counter()
        nbytes = part.element_size()
        if not self.by_shares:
            tdist.all_reduce(part)
            return (part, int(2 * (W - 1) / W * self.num_params * nbytes),
                    time.perf_counter() - t0)
        b = self.bounds
        widest = max(b[v + 1] - b[v] for v in range(W))
        gathered = [torch.empty(widest, dtype=part.dtype, device=part.device) for _ in range(W)]
        tdist.all_gather(gathered, _padded(part, widest))
        direction = torch.cat([g[:b[v + 1] - b[v]] for v, g in enumerate(gathered)])
        return direction, (W - 1) * widest * nbytes, time.perf_counter() - t0

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, learner, split, episodes, queries, batch, progress=False) -> dict:
        """Episode batches round robin over the ranks; every rank gets the statistics."""
        from amfs_dist.evaluate import episode_batches, score_batches, summarize
        mine = episode_batches(episodes, batch)[self.rank::self.world]
        scores = score_batches(learner, self.source, split, mine, queries,
                               progress=progress and self.rank == 0)
        shards: list = [None] * self.world
        tdist.all_gather_object(shards, scores)
        return summarize(shards, episodes, learner.regression)

    def close(self) -> None:
        self.local.close()
