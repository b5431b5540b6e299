"""The experiment file: a grid of ordinary training runs ("cells") over a base config.

    description: what the experiment shows (free text)
    base:        config keys, nested or dotted, over the defaults (as in `amfs train --config`)
    grid:        {config key: [values]}: every combination is a cell
    variants:    {name: {config key: value}}: named settings, crossed with the grid (ablation);
                 a name is a folder name (config.path_label), never a path
    seeds:       N: each cell runs with seed = base seed + 0..N-1
    resources:   {cpus, gpus}: each cell's driver; dist.workers add one bundle each
                 (dist.cpus_per_worker / dist.gpus_per_worker), all in one placement group;
                 bounded as those are (config.resource_key)
    test_steps:  [k, ...]: also evaluate MAML-type cells with maml.test_steps=k (0: no step)
    cross_domain: {name: {config key: value}}: also evaluate every cell with these overrides
                 (e.g. another data.source), as `amfs eval RUN key=value` does

SPEC_SCHEMA holds each key's type, default and rule. A file holding
`experiments: {NAME: {...}, ...}` carries several experiments; its other top-level keys are
defaults for each (base keys merge key by key). key=value overrides set a base key; one that
the grid varies is fixed instead, leaving the grid.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amfs_dist.config import (
    MAX_CPUS,
    MAX_GPUS,
    PATH_LABEL_RULE,
    SCHEMA,
    ConfigError,
    Key,
    check_mapping,
    check_value,
    find_file,
    flatten,
    flatten_as,
    parse_override,
    path_label,
    printable,
    read_yaml_mapping,
    resolve,
    resource_key,
    shipped_files,
    shown,
)

EXPERIMENTS = ("compare", "steps", "cross-domain", "first-order", "stability", "ablation")
# the keys of an experiment file (see the module doc); base, grid, variants and cross_domain
# hold config keys, checked against the config schema
SPEC_SCHEMA: dict[str, Key] = {
    "description": Key((str,), "", nullable=True),
    "base": Key((dict,), {}, nullable=True),
    "grid": Key((dict,), {}, nullable=True),
    "variants": Key((dict,), {}, nullable=True),
    "seeds": Key((int,), 3, lambda v: v >= 1, ">= 1"),
    "resources.cpus": resource_key(1.0, MAX_CPUS, positive=True),
    "resources.gpus": resource_key(0.0, MAX_GPUS),
    "test_steps": Key((list,), [], lambda v: all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
        "a list of integers >= 0", nullable=True),
    "cross_domain": Key((dict,), {}, nullable=True),
}


@dataclass(frozen=True)
class Cell:
    name: str                  # its directory under cells/
    values: dict[str, Any]     # the full flat config
    settings: dict[str, Any]   # what the grid chose: grid keys, variant, seed


@dataclass
class ExperimentSpec:
    """A checked experiment file (its defaults are SPEC_SCHEMA's)."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list]
    variants: dict[str, dict[str, Any]]
    seeds: int
    cpus: float
    gpus: float
    test_steps: list[int]
    cross_domain: dict[str, dict[str, Any]]
    description: str
    source: str  # the file it was read from

    def cells(self) -> list[Cell]:
        """Every cell, validated as a config (errors name the cell's settings)."""
        labels = _labels(list(self.grid))
        out = []
        variants = list(self.variants.items()) or [(None, {})]
        for (variant, changes), combo in itertools.product(
                variants, itertools.product(*self.grid.values())):
            for i in range(self.seeds):
                chosen = dict(zip(self.grid, combo))
                values = {**self.base, **changes, **chosen}
                values["seed"] = int(self.base.get("seed", 0)) + i
                settings = ({"variant": variant} if variant else {}) | chosen | {"seed": values["seed"]}
                try:
                    values = resolve({}, values).to_flat()
                except ConfigError as e:
                    raise ConfigError(f"{self.source}: cell {settings}: {e}") from None
                parts = ([variant] if variant else []) + [
                    labels[k] + _value_label(k, v) for k, v in chosen.items()]
                out.append(Cell("-".join(parts + [f"seed{values['seed']}"]), values, settings))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.source}: two cells share a name; make the grid values "
                              f"distinct ({sorted(n for n in names if names.count(n) > 1)[0]})")
        return out

    def bundles(self, values: dict[str, Any]) -> list[dict[str, float]]:
        from amfs_dist.config import placement_bundles
        return placement_bundles(self.cpus, self.gpus, resolve({}, values).dist)

    def to_dict(self) -> dict:
        return {"description": self.description, "base": self.base, "grid": self.grid,
                "variants": self.variants, "seeds": self.seeds,
                "resources": {"cpus": self.cpus, "gpus": self.gpus},
                "test_steps": self.test_steps, "cross_domain": self.cross_domain}


def _labels(keys: list[str]) -> dict[str, str]:
    """Short names of grid keys for cell names: the method's value alone, else the last part."""
    short = {k: "" if k == "method" else k.split(".")[-1] for k in keys}
    clash = {s for s in short.values() if s and list(short.values()).count(s) > 1}
    return {k: (k if s in clash else s) for k, s in short.items()}


def _value_label(key: str, value: Any) -> str:
    """A grid value as part of a folder name: safe characters only, and short (a folder name
    has at most 255 bytes; values cut to the same label are caught as a name clash)."""
    text = Path(str(value)).name if key == "data.source" else str(value)
    return re.sub(r"[^A-Za-z0-9._+]", "_", text)[:40]


def load_experiment(name: str, path: str | Path | None = None,
                    overrides: list[str] | None = None, seeds: int | None = None) -> ExperimentSpec:
    if name not in EXPERIMENTS:
        raise ConfigError(f"experiment {name!r}: must be one of {', '.join(EXPERIMENTS)}")
    path = (find_file(path, "experiments", "experiment file") if path
            else shipped_files("experiments")[name])
    tree = read_yaml_mapping(path, "experiment file")
    if "experiments" in tree:
        sections = tree.pop("experiments")
        if not isinstance(sections, dict) or name not in sections:
            raise ConfigError(f"{path}: experiments: has no {name!r} (it has "
                              f"{', '.join(sections) if isinstance(sections, dict) else 'none'})")
        section = sections[name] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: experiments.{name}: expected a mapping")
        merged = {**tree, **section}
        merged["base"] = {**flatten(tree.get("base") or {}), **flatten(section.get("base") or {})}
        tree = merged
    return _parse(name, tree, str(path), overrides or [], seeds)


def _parse(name: str, tree: dict, where: str, overrides: list[str],
           seeds: int | None) -> ExperimentSpec:
    given = flatten_as(tree, SPEC_SCHEMA)
    if seeds is not None:  # --seeds: its error names the flag, not the file
        given["seeds"] = check_value("--seeds", SPEC_SCHEMA["seeds"], seeds)
    try:
        spec = check_mapping(SPEC_SCHEMA, given, what="key (keys: " + ", ".join(
            sorted({k.split(".")[0] for k in SPEC_SCHEMA})) + ")")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    base = flatten(spec["base"] or {})
    grid = dict(spec["grid"] or {})
    variants, cross = {}, {}
    for section, into in (("variants", variants), ("cross_domain", cross)):
        for label, changes in (spec[section] or {}).items():
            label = str(label)
            if section == "variants" and not path_label(label):  # it names the cells' folders
                raise ConfigError(f"{where}: variants.{printable(label)}: must be "
                                  f"{PATH_LABEL_RULE}")
            if not isinstance(changes, dict | None):
                raise ConfigError(f"{where}: {section}.{printable(label)}: expected a mapping of config "
                                  f"keys, got {changes!r}")
            into[label] = flatten(changes or {})
    for key in list(base) + list(grid) + [k for v in (*variants.values(), *cross.values()) for k in v]:
        if key not in SCHEMA:
            raise ConfigError(f"{where}: {printable(key)}: unknown config key")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{printable(key)}: expected a non-empty list, "
                              f"got {shown(values)}")
    for key, value in (parse_override(o) for o in overrides):
        if key not in SCHEMA:
            raise ConfigError(f"{printable(key)}: unknown config key")
        grid.pop(key, None)  # a value given on the command line fixes a grid dimension
        base[key] = value
        for changes in variants.values():
            changes.pop(key, None)
    experiment = ExperimentSpec(name, base, grid, variants, spec["seeds"],
                                spec["resources.cpus"], spec["resources.gpus"],
                                list(spec["test_steps"] or []), cross,
                                spec["description"] or "", where)
    experiment.cells()  # every cell's config is valid before anything starts
    return experiment

