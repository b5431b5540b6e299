"""The cross-domain image rule: bring any store's images to the shape a model was built for.

  channels  RGB -> grey: ITU-R BT.601 luminance, Y = 0.299 R + 0.587 G + 0.114 B
            grey -> RGB: the grey channel repeated three times
  size      bilinear resize with antialias to target_size x target_size (aspect not kept),
            clamped back into [0, 1]
Identity (the same tensor) when the shape already matches. Both steps are linear per pixel,
so their order does not change the result; the cheaper order is used (fewer channels to
resize).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from amfs_dist.errors import UserError

LUMA_601 = (0.299, 0.587, 0.114)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == channels:
        return x
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise UserError(f"cannot convert {have}-channel images to {channels} channels "
                    f"(only 1 <-> 3)")


def _to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def image_converter(target_channels: int, target_size: int
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping float images [..., C, H, W] in [0, 1] to [..., target_channels,
    target_size, target_size] by the rule above (leading dims, e.g. [T, N], are kept)."""
    if target_channels not in (1, 3):
        raise UserError(f"data.channels must be 1 or 3, got {target_channels}")
    if target_size < 1:
        raise UserError(f"data.image_size must be >= 1, got {target_size}")

    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] == target_channels and tuple(x.shape[-2:]) == (target_size, target_size):
            return x
        lead = x.shape[:-3]
        flat = x.reshape((-1,) + tuple(x.shape[-3:]))
        if flat.shape[1] > target_channels:  # fewer channels first: less to resize
            flat = _to_size(_to_channels(flat, target_channels), target_size)
        else:
            flat = _to_channels(_to_size(flat, target_size), target_channels)
        return flat.reshape(tuple(lead) + tuple(flat.shape[1:]))

    return convert
