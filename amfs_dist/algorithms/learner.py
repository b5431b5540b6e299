"""The meta-learner: encoder + inner loop as one per-task loss, vmapped over a batch of tasks.

`meta_gradients` is the unit of work the distributed layer ships: one batched pass giving
the [T, P] matrix of per-task meta-gradients plus per-task loss and accuracy.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from amfs_dist.algorithms import maml
from amfs_dist.algorithms.heads import head_class
from amfs_dist.algorithms.heads.base import PREFIX, Head, loss_and_accuracy
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

    def __init__(self, params: Mapping[str, torch.Tensor]):
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


def block(name: str) -> tuple[str, ...]:
    """The encoder block a parameter belongs to: "backbone.blocks.3.conv.weight" ->
    ("blocks", "3"); "backbone.fc2.weight" -> ("fc2",)."""
    parts = name.split(".")[1:]
    return tuple(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else tuple(parts[:1])


class MetaLearner:
    """Builds the model for a config and computes per-task losses and meta-gradients."""

    def __init__(self, cfg: Config, input_shape: tuple[int, ...], device: str | torch.device = "cpu"):
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
        self.head: Head = head_class(self.inner)(cfg, features, self.regression, self.ways)
        self.module = nn.ModuleDict({"backbone": backbone, "head": self.head}).to(self.device)
        self.layout = ParamLayout(self.params())
        # eval.finetune_params: what test-time fine-tuning updates
        encoder = [n for n in self.layout.names if n.startswith("backbone.")]
        last = [n for n in encoder if block(n) == block(encoder[-1])]
        self.finetuned = {"all": encoder, "last": last}
        self.autocast = (cfg.train.precision == "bf16")
        # train.deterministic: one task per chunk, so a task's gradient is computed by the
        # same kernels whatever the number of tasks in this process's pass
        self.task_chunk = 1 if cfg.train.deterministic else (cfg.train.task_chunk or None)

    @property
    def cfg(self) -> Config:
        return self.head.cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        """Adapt with other settings from now on (amfs bench adapt: maml.test_steps); the model
        stays as it was built."""
        self.head.cfg = cfg

    # -- parameters ---------------------------------------------------------------------------
    @property
    def constants(self) -> Params:
        """Parameters that are not learned (buffers, e.g. a fixed kernel bandwidth)."""
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

    def adapt_predict(self, params: Params, xs, ys, xq, training: bool = True,
                      ways: int | None = None):
        """Adapt to one task's support set, predict its queries: (outputs, loss penalty).
        ways: the task's number of classes (default data.ways)."""
        head_constants = {PREFIX + k: v for k, v in self.head.named_buffers()}
        return self.head.adapt_predict({**head_constants, **params}, self._features, xs, ys, xq,
                                       ways or self.ways, training)

    def task_loss(self, params: Params, xs, ys, xq, yq, training: bool = True,
                  ways: int | None = None):
        """One task's query loss after inner adaptation (plus the head's penalty), and its
        accuracy."""
        out, penalty = self.adapt_predict(params, xs, ys, xq, training, ways)
        loss, acc = loss_and_accuracy(out, yq, self.regression)
        return loss + penalty, acc

    def finetune(self, params: Params, xs, ys, ways: int | None = None) -> Params:
        """Test-time fine-tuning (docs/algorithm.md): eval.finetune_steps SGD steps of the head's
        support loss on the encoder's parameters (eval.finetune_params: all, or its last block),
        from the support set alone. The parameters unchanged with eval.finetune_steps=0."""
        e = self.cfg.eval
        if e.finetune_steps == 0:
            return params
        head_constants = {PREFIX + k: v for k, v in self.head.named_buffers()}
        ways = ways or self.ways

        def loss(tuned, x, y):
            return self.head.support_loss({**head_constants, **params, **tuned}, self._features,
                                          x, y, ways)

        tuned = maml.adapt(loss, {n: params[n] for n in self.finetuned[e.finetune_params]}, xs,
                           ys, e.finetune_steps, e.finetune_lr, first_order=True)
        return {**params, **tuned}

    def support_loss(self, params: Params, xs, ys, ways: int | None = None) -> torch.Tensor:
        """One task's support loss, the one finetune lowers."""
        head_constants = {PREFIX + k: v for k, v in self.head.named_buffers()}
        return self.head.support_loss({**head_constants, **params}, self._features, xs, ys,
                                      ways or self.ways)

    # -- batched over tasks ----------------------------------------------------------------------
    def meta_gradients(self, params: Params, ep: Episodes) -> TaskGradients:
        """Per-task meta-gradients [T, P] of the query loss in one vmapped pass."""
        ep = ep.to(self.device)

        def per_task(p, xs, ys, xq, yq):
            loss, acc = self.task_loss(p, xs, ys, xq, yq, training=True, ways=ep.ways)
            return loss, (loss.detach(), acc)

        with self.autocast_context():
            grads, (loss, acc) = vmap(grad(per_task, has_aux=True), in_dims=(None, 0, 0, 0, 0),
                                      chunk_size=self.task_chunk)(params, ep.xs, ep.ys, ep.xq, ep.yq)
        return TaskGradients(self.layout.flatten(grads, batch_dims=1), loss, acc)

    def evaluate(self, params: Params, ep: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time adaptation and query loss/accuracy per task, no meta-gradient."""
        ep = ep.to(self.device)
        params = {k: v.detach() for k, v in params.items()}
        fn = vmap(lambda xs, ys, xq, yq: self.task_loss(self.finetune(params, xs, ys, ep.ways), xs,
                                                        ys, xq, yq, training=False, ways=ep.ways),
                  chunk_size=self.task_chunk)
        takes_grad = self.head.needs_grad_at_test or self.cfg.eval.finetune_steps > 0
        grad_mode = torch.enable_grad() if takes_grad else torch.no_grad()
        with grad_mode, self.autocast_context():
            loss, acc = fn(ep.xs, ep.ys, ep.xq, ep.yq)
        return loss.detach(), acc.detach()

    def autocast_context(self):
        """bf16 autocast for the encoder when train.precision=bf16, else nothing."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

