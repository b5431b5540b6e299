"""The head registry: `inner` name -> head class, and the method presets that use each head.

A head is what turns encoder features into a task's predictions (heads/base.py). This module
is plain data, so that reading a config does not import torch: a head's class is imported on
first use. Adding a method (MetaOptNet's svm.py is the example):

1. a head file here: a FeatureHead (predictions from support and query features) or a Head
   (anything else: adapt_predict is given the encoder, as MAML's);
   test-time fine-tuning (eval.finetune_steps) uses its support_loss, leave-one-out by default;
2. one HeadEntry below, with the method presets that use it (`amfs bench train` runs every
   preset);
3. its own config keys, if any, in config.py's SCHEMA (svm.c, svm.steps);
4. a section in docs/algorithm.md, rows in README's methods and keys tables;
5. tests: a float64 reference and a gradcheck of its solve, and its name in
   tests/test_methods_learn.py; the method in experiments/compare.yaml.
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
    # adapts by maml.test_steps gradient steps at test time (the steps experiment varies them)
    test_time_steps: bool = False


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
    }, test_time_steps=True),
    HeadEntry("fomaml", "amfs_dist.algorithms.heads.maml:FirstOrderMAMLHead", {
        "fomaml": {"outer.weighting": "mean"},
    }, test_time_steps=True),
    HeadEntry("protonet", "amfs_dist.algorithms.heads.protonet:ProtoNetHead", {
        "protonet": {"outer.weighting": "mean"},
    }, classification_only=True),
    HeadEntry("svm", "amfs_dist.algorithms.heads.svm:SVMHead", {
        "metaoptnet": {"outer.weighting": "mean"},
    }, classification_only=True),
)

HEADS = {entry.inner: entry for entry in ENTRIES}
INNER_LOOPS = tuple(HEADS)  # the built-in heads; HEADS also holds the registered ones
# method -> inner loop, outer weighting and any method defaults it changes
PRESETS = {method: {"inner": entry.inner, **values}
           for entry in ENTRIES for method, values in entry.presets.items()}
_registered: dict[str, type[Head]] = {}  # inner -> a head class given to register()


def register(inner: str, head: type[Head], presets: dict[str, dict[str, Any]], *,
             classification_only: bool = False, test_time_steps: bool = False) -> None:
    """Add a head of one's own, and the methods that use it, without editing this package
    (examples/custom_head.py). It is known in this process only: a run that uses it trains
    in-process (dist.workers=0), since Ray workers do not run the code that registered it."""
    taken = [name for name in (inner, *presets) if name in HEADS or name in PRESETS]
    if taken:
        raise ValueError(f"head registry: {', '.join(taken)} already taken")
    HEADS[inner] = HeadEntry(inner, f"{head.__module__}:{head.__qualname__}", dict(presets),
                             classification_only, test_time_steps)
    _registered[inner] = head
    PRESETS.update({method: {"inner": inner, **values} for method, values in presets.items()})


def head_class(inner: str) -> type[Head]:
    if inner in _registered:
        return _registered[inner]
    module, name = HEADS[inner].path.split(":")
    return getattr(importlib.import_module(module), name)
