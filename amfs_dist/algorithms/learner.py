"""The meta-learner: encoder + inner loop as one per-task loss, vmapped over a batch of tasks.

`meta_gradients` is the unit of work the distributed layer ships: one batched pass giving
the [T, P] matrix of per-task meta-gradients plus per-task loss and accuracy.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from amfs_dist.algorithms import kernel, maml, protonet
from amfs_dist.config import Config
from amfs_dist.data.episodes import Episodes
from amfs_dist.errors import UserError
from amfs_dist.models.backbones import build_backbone, feature_dim

Params = dict[str, torch.Tensor]


@dataclass
class TaskGradients:
    grads: torch.Tensor  # [T, P], flattened in ParamLayout order
    loss: torch.Tensor   # [T]
    acc: torch.Tensor    # [T] (NaN for regression)


class ParamLayout:
    """Names and shapes of the learnable parameters, to flatten dicts into rows and back."""

    def __init__(self, params: Params):
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [math.prod(s) for s in self.shapes]
        self.size = sum(self.numels)

    def flatten(self, tree: Params, batch_dims: int = 0) -> torch.Tensor:
        lead = tree[self.names[0]].shape[:batch_dims]
        return torch.cat([tree[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> Params:
        return {n: chunk.view(s) for n, chunk, s in
                zip(self.names, flat.split(self.numels, dim=-1), self.shapes)}


class KernelHead(nn.Module):
    """The kernel inner loop's own meta-parameters: log bandwidth (RBF only), log lambda, output
    scale (and bias, for regression)."""

    def __init__(self, cfg: Config, regression: bool):
        super().__init__()
        k = cfg.kernel
        log_lam = torch.tensor(math.log(k.lam))
        if k.type == "rbf":
            log_bw = torch.tensor(math.log(k.bandwidth))
            if k.learn_bandwidth:
                self.log_bandwidth = nn.Parameter(log_bw)
            else:
                self.register_buffer("log_bandwidth", log_bw)
        if k.learn_lam:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        # logits from a kernel fit to one-hot targets lie in ~[0, 1]; softmax needs a wider range
        self.scale = nn.Parameter(torch.tensor(1.0 if regression else 10.0))
        # a bias shared by all classes does nothing under softmax (its gradient is exactly 0,
        # and Adam would turn float noise in it into full-size steps): regression only
        if regression:
            self.bias = nn.Parameter(torch.tensor(0.0))


class ProtoHead(nn.Module):
    """ProtoNet's one meta-parameter: a scale on the logits -||z - c_k||^2 (a learned softmax
    temperature; it starts at 1, Snell et al.'s plain distances)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))


class MetaLearner:
    """Builds the model for a config and computes per-task losses and meta-gradients."""

    def __init__(self, cfg: Config, input_shape: tuple[int, ...], device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.ways = cfg.data.ways
        self.regression = cfg.data.source == "sinusoid"
        self.inner = cfg.inner_loop
        self.device = torch.device(device)
        backbone = build_backbone(cfg.backbone, input_shape, cfg.model.width)
        try:
            features = feature_dim(backbone, input_shape)
        except RuntimeError as e:
            raise UserError(f"data.image_size: input of shape {tuple(input_shape)} does not fit "
                            f"model.backbone={cfg.backbone} ({e})") from None
        out_dim = 1 if self.regression else self.ways
        if self.inner == "kernel":
            head = KernelHead(cfg, self.regression)
        elif self.inner == "protonet":
            head = ProtoHead()
        else:
            head = nn.Linear(features, out_dim)
        self.module = nn.ModuleDict({"backbone": backbone, "head": head}).to(self.device)
        self.layout = ParamLayout(self.params())
        self.autocast = (cfg.train.precision == "bf16")
        # train.deterministic: one task per chunk, so a task's gradient is computed by the
        # same kernels whatever the number of tasks in this process's pass
        self.task_chunk = 1 if cfg.train.deterministic else (cfg.train.task_chunk or None)

    # -- parameters ---------------------------------------------------------------------------
    @property
    def constants(self) -> Params:
        """Kernel parameters that are not learned (buffers)."""
        return dict(self.module.named_buffers())

    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def flat_params(self) -> torch.Tensor:
        return self.layout.flatten({k: v.detach() for k, v in self.params().items()})

    def load_flat(self, flat: torch.Tensor) -> Params:
        """Parameters as views of a flat vector (moved to this learner's device)."""
        return self.layout.unflatten(flat.to(self.device))

    # -- per-task pieces (vmap-safe) -------------------------------------------------------------
    def _features(self, params: Params, x: torch.Tensor, n_stats: int | None) -> torch.Tensor:
        body = {k[len("backbone."):]: v for k, v in params.items() if k.startswith("backbone.")}
        return functional_call(self.module["backbone"], body, (x, n_stats))

    def _targets(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.regression:
            return y.to(dtype)
        return (y[:, None] == torch.arange(self.ways, device=y.device)).to(dtype)

    def _loss_acc(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.regression:
            return F.mse_loss(out, y.to(out.dtype)), torch.full((), float("nan"), device=out.device,
                                                                 dtype=out.dtype)
        loss = F.cross_entropy(out, y)
        acc = (out.argmax(-1) == y).to(out.dtype).mean()
        return loss, acc

    def _kernel_predict(self, params: Params, xs, ys, xq, first_order: bool):
        k = self.cfg.kernel
        p = {**self.constants, **params}
        n_s = xs.shape[0]
        z = _at_least_float32(self._features(params, torch.cat([xs, xq]), n_s))
        if k.normalize:
            z = F.normalize(z, dim=-1)
        zs, zq = z[:n_s], z[n_s:]
        if k.type == "linear":
            gram = kernel.linear_kernel
        else:
            gram = lambda a, b: kernel.rbf_kernel(a, b, p["head.log_bandwidth"])
        with _no_autocast(z.device):
            lam = torch.exp(p["head.log_lam"])
            K = gram(zs, zs)
            alpha = kernel.solve_coefficients(K, self._targets(ys, z.dtype), lam, k.mu)
            if first_order:
                alpha = alpha.detach()
            out = p["head.scale"] * (gram(zq, zs) @ alpha)
            if self.regression:
                out = out + p["head.bias"]
            penalty = k.gamma * kernel.information_term(K, lam) / n_s if k.gamma > 0 else 0.0
        return out, penalty

    def _protonet_predict(self, params: Params, xs, ys, xq):
        n_s = xs.shape[0]
        z = _at_least_float32(self._features(params, torch.cat([xs, xq]), n_s))
        with _no_autocast(z.device):
            protos = protonet.prototypes(z[:n_s], self._targets(ys, z.dtype))
            return params["head.scale"] * protonet.logits(z[n_s:], protos), 0.0

    def _head_out(self, params: Params, x: torch.Tensor, n_stats: int | None) -> torch.Tensor:
        h = self._features(params, x, n_stats)
        return _at_least_float32(F.linear(h, params["head.weight"], params["head.bias"]))

    def _support_loss(self, params: Params, xs, ys):
        return self._loss_acc(self._head_out(params, xs, None), ys)[0]

    def _maml_predict(self, params: Params, xs, ys, xq, steps: int):
        fast = maml.adapt(self._support_loss, params, xs, ys, steps, self.cfg.maml.lr,
                          first_order=(self.inner == "fomaml"))
        n_s = xs.shape[0]
        return self._head_out(fast, torch.cat([xs, xq]), n_s)[n_s:], 0.0

    def adapt_predict(self, params: Params, xs, ys, xq, training: bool = True):
        """Adapt to one task's support set, predict its queries: (outputs, loss penalty)."""
        if self.inner == "kernel":
            return self._kernel_predict(params, xs, ys, xq, self.cfg.kernel.first_order and training)
        if self.inner == "protonet":
            return self._protonet_predict(params, xs, ys, xq)
        steps = self.cfg.maml.steps if training else self.cfg.maml.test_steps
        return self._maml_predict(params, xs, ys, xq, steps)

    def task_loss(self, params: Params, xs, ys, xq, yq, training: bool = True):
        """One task's query loss after inner adaptation (plus the gamma term), and its accuracy."""
        out, penalty = self.adapt_predict(params, xs, ys, xq, training)
        loss, acc = self._loss_acc(out, yq)
        return loss + penalty, acc

    # -- batched over tasks ----------------------------------------------------------------------
    def meta_gradients(self, params: Params, ep: Episodes) -> TaskGradients:
        """Per-task meta-gradients [T, P] of the query loss in one vmapped pass."""
        ep = ep.to(self.device)

        def per_task(p, xs, ys, xq, yq):
            loss, acc = self.task_loss(p, xs, ys, xq, yq, training=True)
            return loss, (loss.detach(), acc)

        with self.autocast_context():
            grads, (loss, acc) = vmap(grad(per_task, has_aux=True), in_dims=(None, 0, 0, 0, 0),
                                      chunk_size=self.task_chunk)(params, ep.xs, ep.ys, ep.xq, ep.yq)
        return TaskGradients(self.layout.flatten(grads, batch_dims=1), loss, acc)

    def evaluate(self, params: Params, ep: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time adaptation and query loss/accuracy per task, no meta-gradient."""
        ep = ep.to(self.device)
        params = {k: v.detach() for k, v in params.items()}
        fn = vmap(lambda xs, ys, xq, yq: self.task_loss(params, xs, ys, xq, yq, training=False),
                  chunk_size=self.task_chunk)
        grad_mode = torch.enable_grad() if self.inner in ("maml", "fomaml") else torch.no_grad()
        with grad_mode, self.autocast_context():
            loss, acc = fn(ep.xs, ep.ys, ep.xq, ep.yq)
        return loss.detach(), acc.detach()

    def autocast_context(self):
        """bf16 autocast for the encoder when train.precision=bf16, else nothing."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses and the kernel solve never run in half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _no_autocast(device: torch.device):
    """The kernel solve runs in float32 whatever the encoder's precision."""
    return torch.autocast(device.type, enabled=False)
