"""Encoders: Conv-4, ResNet-12 and an MLP, with non-transductive batch norm.

Every forward takes `n_stats`: batch-norm statistics come from the first n_stats rows only.
Callers put a task's support set first, so query images never shape the statistics, in
training and at test time alike (docs/algorithm.md: support-set statistics, no running averages).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SupportBatchNorm(nn.Module):
    """Batch norm whose statistics come from the leading n_stats rows (the support set)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor, n_stats: int | None) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # statistics in half precision are too coarse
            x = x.float()
        ref = x if n_stats is None else x[:n_stats]
        dims = [0] + list(range(2, x.dim()))
        mean = ref.mean(dims, keepdim=True)
        var = ref.var(dims, unbiased=False, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)  # the norm's bias replaces it
        self.norm = SupportBatchNorm(cout)

    def forward(self, x, n_stats):
        return F.max_pool2d(F.relu(self.norm(self.conv(x), n_stats)), 2)


class Conv4(nn.Module):
    """Four 3x3 conv blocks of `width` channels (MAML: 32 for mini-ImageNet, ProtoNets: 64)."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ConvBlock(in_channels if i == 0 else width, width) for i in range(4)])

    def forward(self, x, n_stats=None):
        for block in self.blocks:
            x = block(x, n_stats)
        return x.flatten(1)


class ResidualBlock(nn.Module):
    """MetaOptNet's block: three conv-BN-LeakyReLU, a 1x1 projected shortcut, max-pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False)
                                    for i in range(3)])
        self.norms = nn.ModuleList([SupportBatchNorm(cout) for _ in range(3)])
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.shortcut_norm = SupportBatchNorm(cout)

    def forward(self, x, n_stats):
        residual = self.shortcut_norm(self.shortcut(x), n_stats)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x), n_stats)
            if i < 2:
                x = F.leaky_relu(x, 0.1)
        return F.max_pool2d(F.leaky_relu(x + residual, 0.1), 2)


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet (Lee et al. 2019): widths (w, 2.5w, 5w, 10w), w=64 -> 64-160-320-640.

    DropBlock is left out: it is a regulariser, not part of the architecture's interface.
    """

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        widths = [width, int(2.5 * width), 5 * width, 10 * width]
        self.blocks = nn.ModuleList(
            [ResidualBlock(cin, cout) for cin, cout in zip([in_channels] + widths[:-1], widths)])

    def forward(self, x, n_stats=None):
        for block in self.blocks:
            x = block(x, n_stats)
        return x.flatten(1)


class MLP(nn.Module):
    """The MAML regression network's body: in -> width -> width, ReLU (MAML: 40-40)."""

    def __init__(self, in_features: int = 1, width: int = 40):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x, n_stats=None):
        return F.relu(self.fc2(F.relu(self.fc1(x))))


DEFAULT_WIDTH = {"conv4": 32, "resnet12": 64, "mlp": 40}


def build_backbone(name: str, input_shape: tuple[int, ...], width: int | None = None) -> nn.Module:
    width = width or DEFAULT_WIDTH[name]
    if name == "conv4":
        return Conv4(input_shape[0], width)
    if name == "resnet12":
        return ResNet12(input_shape[0], width)
    if name == "mlp":
        return MLP(input_shape[0], width)
    raise ValueError(f"model.backbone: unknown backbone {name!r}")


def feature_dim(backbone: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return backbone(torch.zeros(2, *input_shape)).shape[-1]
