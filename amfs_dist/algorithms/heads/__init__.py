"""The head registry: `inner` name -> head class, and the method presets that use each head.

A head is what turns encoder features into a task's predictions (heads/base.py). This module
is plain data, so that reading a config does not import torch: a head's class is imported on
first use. To add a method, write its head file and add one HeadEntry here (CONTRIBUTING.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amfs_dist.algorithms.heads.base import Head


@dataclass(frozen=True)
class HeadEntry:
    inner: str                 # the `inner` config value that selects this head
    path: str                  # "module:Class" of the head
    # method name -> the config values it sets; null keys then read as these
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    classification_only: bool = False  # refused with data.source=sinusoid (regression)


ENTRIES = (
    HeadEntry("kernel", "amfs_dist.algorithms.heads.kernel:KernelHead", {
        "amfs": {"outer.weighting": "cosine"},
        "iamfs": {"outer.weighting": "mean"},
        # Bertinetto et al. 2019: ridge regression on the raw features, learned lambda and scale
        "r2d2": {"outer.weighting": "mean", "kernel.type": "linear", "kernel.normalize": False,
                 "kernel.mu": 0.0, "kernel.gamma": 0.0, "kernel.learn_lam": True},
    }),
    HeadEntry("maml", "amfs_dist.algorithms.heads.maml:MAMLHead", {
        "oamfs": {"outer.weighting": "cosine"},
        "maml": {"outer.weighting": "mean"},
    }),
    HeadEntry("fomaml", "amfs_dist.algorithms.heads.maml:FirstOrderMAMLHead", {
        "fomaml": {"outer.weighting": "mean"},
    }),
    HeadEntry("protonet", "amfs_dist.algorithms.heads.protonet:ProtoNetHead", {
        "protonet": {"outer.weighting": "mean"},
    }, classification_only=True),
    HeadEntry("svm", "amfs_dist.algorithms.heads.svm:SVMHead", {
        "metaoptnet": {"outer.weighting": "mean"},
    }, classification_only=True),
)

HEADS = {entry.inner: entry for entry in ENTRIES}
INNER_LOOPS = tuple(HEADS)
# method -> inner loop, outer weighting and any method defaults it changes
PRESETS = {method: {"inner": entry.inner, **values}
           for entry in ENTRIES for method, values in entry.presets.items()}


def head_class(inner: str) -> type[Head]:
    module, name = HEADS[inner].path.split(":")
    return getattr(importlib.import_module(module), name)
