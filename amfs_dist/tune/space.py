"""The sweep file: a base training config, a search space over config keys, sweep settings.

    base:                       # an amfs config (same dotted keys as `amfs train`), flat or nested
      data.ways: 5
      train.steps: 40
      train.val_every: 10       # trials report validation accuracy every val_every steps
    search:                     # config key -> one distribution
      kernel.bandwidth: {loguniform: [0.1, 10.0]}
      kernel.lam: {loguniform: [0.001, 1.0]}
      kernel.mu: {uniform: [0.0, 0.5]}
      kernel.gamma: {uniform: [0.0, 0.1]}
      model.width: {choice: [16, 32]}      # also: [16, 32] alone
      maml.steps: {randint: [1, 5]}        # integers, both ends included
    sweep:                      # settings, see SETTINGS
      num_samples: 8
      max_concurrent_trials: 2

Overrides (`amfs tune ... key=value`): `sweep.NAME=V` sets a setting, `search.KEY=V` replaces or
adds a dimension (V is YAML, e.g. 'search.kernel.lam={loguniform: [0.01, 1]}'), and any other
key sets the base config; a base override of a swept key fixes it (it leaves the search).

Everything is validated here, before Ray starts: errors are one line naming the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amfs_dist.config import (
    MAX_CPUS,
    MAX_GPUS,
    PATH_LABEL_RULE,
    SCHEMA,
    Config,
    ConfigError,
    Key,
    Values,
    check_mapping,
    dump_yaml,
    find_file,
    flatten,
    flatten_as,
    parse_override,
    path_label,
    placement_bundles,
    printable,
    read_yaml_mapping,
    resolve,
    resource_key,
    shipped_files,
)
from amfs_dist.files import write_text

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "lograndint", "choice")
RANGE_KINDS = ("loguniform", "uniform", "randint", "lograndint")
# keys a sweep cannot vary: they set the trial's resources or ASHA's time axis
FIXED_PREFIXES = ("dist.",)
FIXED_KEYS = ("train.steps", "train.val_every")
METRICS = {"val_accuracy": "max", "val_loss": "min"}
BUILTIN_SOURCES = ("synthetic", "shapes", "sinusoid")


@dataclass(frozen=True)
class Dist:
    """One search dimension; ranges include both ends."""

    key: str
    kind: str
    low: Any = None
    high: Any = None
    choices: tuple = ()

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "lograndint")

    def to_tune(self):
        from ray import tune
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "randint":  # Tune's upper bound is exclusive
            return tune.randint(self.low, self.high + 1)
        if self.kind == "lograndint":
            return tune.lograndint(self.low, self.high + 1)
        return tune.choice(list(self.choices))

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind in ("randint", "lograndint") and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def to_yaml(self):
        if self.kind == "choice":
            return {"choice": list(self.choices)}
        return {self.kind: [self.low, self.high]}

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice " + ", ".join(map(repr, self.choices))
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


SETTINGS: dict[str, Key] = {
    "name": Key((str,), "sweep", path_label, PATH_LABEL_RULE),
    "num_samples": Key((int,), 8, lambda v: v >= 1, ">= 1"),
    "max_concurrent_trials": Key((int,), 2, lambda v: v >= 1, ">= 1 (or null: no limit)", True),
    "seed": Key((int,), 0, lambda v: v >= 0, ">= 0"),
    "metric": Key((str,), "val_accuracy", lambda v: v in METRICS, "val_accuracy or val_loss"),
    "scheduler": Key((str,), "asha", lambda v: v in ("asha", "fifo"), "asha or fifo"),
    "grace_period": Key((int,), 1, lambda v: v >= 1, ">= 1 (validations)"),
    "reduction_factor": Key((float,), 2.0, lambda v: v > 1, "> 1"),
    "startup_trials": Key((int,), 10, lambda v: v >= 1, ">= 1"),
    "trial_cpus": resource_key(1.0, MAX_CPUS, positive=True),
    "trial_gpus": resource_key(0.0, MAX_GPUS),
    "max_failures": Key((int,), 1, lambda v: v >= 0, ">= 0"),
    "keep_checkpoints": Key((int,), 2, lambda v: v >= 1, ">= 1"),
    "test_episodes": Key((int,), None, lambda v: v >= 1, ">= 1 (or null: eval.episodes)", True),
    "points_to_evaluate": Key((list,), [], None),
}
# the sections of a sweep file (a missing or empty one is {})
SECTIONS: dict[str, Key] = {name: Key((dict,), {}, nullable=True)
                            for name in ("base", "search", "sweep")}


class SweepSettings(Values):
    """The checked `sweep:` settings (SETTINGS), read as settings.num_samples."""

    @property
    def mode(self) -> str:
        return METRICS[self.metric]


@dataclass
class SweepSpec:
    base: Config
    search: dict[str, Dist]
    settings: SweepSettings
    source: str  # the file it was read from

    @property
    def metric(self) -> str:
        return self.settings.metric

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def max_reports(self) -> int:
        """Validations per trial: ASHA's max_t (the trial reports once per validation)."""
        t = self.base.train
        return math.ceil(t.steps / t.val_every)

    def param_space(self) -> dict:
        """Tune's param_space: every config key, the swept ones as Tune domains."""
        space = {k: v for k, v in self.base.to_flat().items() if k not in self.search}
        space.update({k: d.to_tune() for k, d in self.search.items()})
        return space

    def bundles(self) -> list[dict[str, float]]:
        """Placement group bundles: the trial's driver, then one per distributed worker."""
        return placement_bundles(self.settings.trial_cpus, self.settings.trial_gpus, self.base.dist)

    def to_yaml_dict(self) -> dict:
        return {"base": self.base.to_dict(),
                "search": {k: d.to_yaml() for k, d in self.search.items()},
                "sweep": self.settings.to_dict()}

    def save(self, path: str | Path) -> None:
        write_text(Path(path), dump_yaml(self.to_yaml_dict(), sort_keys=False))


# the sweep `amfs tune` runs without --config: amfs_dist/tuning/tiny-cpu.yaml
DEFAULT_SWEEP = "tiny-cpu"


def _yaml_value(v):
    return dump_yaml(v, default_flow_style=True).strip().removesuffix("...").strip()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_dist(key: str, spec: Any, base: dict[str, Any]) -> Dist:
    """One search entry -> Dist, validated against the config schema (names search.KEY)."""
    name = f"search.{printable(key)}"
    if key not in SCHEMA:
        raise ConfigError(f"{name}: unknown config key")
    if key.startswith(FIXED_PREFIXES) or key in FIXED_KEYS:
        raise ConfigError(f"{name}: cannot be swept (it sets the trials' resources or ASHA's "
                          f"time axis); set it in base:")
    if isinstance(spec, list):  # shorthand for a choice
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{name}: expected one distribution, e.g. {{loguniform: [low, high]}} "
                          f"or {{choice: [a, b]}}, got {_yaml_value(spec)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{name}: unknown distribution {kind!r} (expected one of "
                          f"{', '.join(DISTRIBUTIONS)})")
    types = SCHEMA[key].types
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{name}: choice needs a non-empty list, got {_yaml_value(args)}")
        seen = []
        for v in args:
            if v in seen:
                raise ConfigError(f"{name}: choice lists {v!r} twice")
            seen.append(v)
        dist = Dist(key, kind, choices=tuple(args))
        values = [("choice", v) for v in args]
    else:
        if bool in types or str in types:
            raise ConfigError(f"{name}: {kind} needs a numeric key, {key} is a "
                              f"{'boolean' if bool in types else 'string'}; use choice")
        if (not isinstance(args, list) or len(args) != 2
                or not all(_is_number(v) for v in args)):
            raise ConfigError(f"{name}: {kind} needs [low, high] numbers, got {_yaml_value(args)}")
        low, high = args
        if kind in ("randint", "lograndint"):
            if not all(float(v).is_integer() for v in args):
                raise ConfigError(f"{name}: {kind} needs integer bounds, got {_yaml_value(args)}")
            low, high = int(low), int(high)
        elif int in types and float not in types:
            raise ConfigError(f"{name}: {key} is an integer; use randint or lograndint, not {kind}")
        else:
            low, high = float(low), float(high)
        if not low < high:
            raise ConfigError(f"{name}: low must be below high, got [{low:g}, {high:g}]")
        if kind.startswith("log") and low <= 0:
            raise ConfigError(f"{name}: {kind} needs bounds > 0, got [{low:g}, {high:g}]")
        dist = Dist(key, kind, low, high)
        values = [("low", low), ("high", high)]
    for what, v in values:  # every end of the range must be a valid config value
        try:
            resolve(base, {key: v})
        except ConfigError as e:
            raise ConfigError(f"{name}: {what} {v!r} is not a valid value ({e})") from None
    return dist


def _resolve_source(flat: dict[str, Any], check_paths: bool) -> None:
    """data.source: a store path is made absolute (trials run elsewhere) and must exist."""
    src = flat.get("data.source")
    if not isinstance(src, str) or src in BUILTIN_SOURCES:
        return
    path = Path(src).expanduser()
    try:
        exists = path.exists()
    except OSError as e:  # e.g. a name over the filesystem's 255 bytes
        raise ConfigError(f"data.source: {printable(src)} is not a usable path "
                          f"({e.strerror})") from None
    if check_paths and not exists:
        raise ConfigError(f"data.source: no prepared store at {printable(src)} (run `amfs data "
                          f"prepare` first, or pass data.source=PATH)")
    flat["data.source"] = str(path.resolve()) if exists else str(path.absolute())


def load_sweep(path: str | Path | None = None, overrides: list[str] | None = None,
               check_paths: bool = True) -> SweepSpec:
    """Sweep file <- overrides, validated; see the module doc. `path` may name a shipped
    sweep (amfs_dist/tuning/NAME.yaml); None is DEFAULT_SWEEP."""
    found = (shipped_files("tuning")[DEFAULT_SWEEP] if path is None
             else find_file(path, "tuning", "sweep file"))
    where = str(found)
    tree = read_yaml_mapping(found, "sweep file")
    try:
        sections = check_mapping(SECTIONS, tree, what="section (base, search or sweep; config "
                                                      "keys go under base:)")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    base_flat = flatten(sections["base"] or {})
    search_raw = flatten_as(sections["search"] or {}, SCHEMA)
    settings_raw = dict(sections["sweep"] or {})

    fixed: dict[str, Any] = {}
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("sweep."):
            settings_raw[key[len("sweep."):]] = value
        elif key.startswith("search."):
            search_raw[key[len("search."):]] = value
        else:
            fixed[key] = value
    for key in fixed:  # a base override of a swept key fixes that key
        search_raw.pop(key, None)

    base = resolve(base_flat, fixed)  # unknown/invalid base keys: ConfigError naming the key
    flat = base.to_flat()
    _resolve_source(flat, check_paths)
    base = resolve(flat, {})

    settings = SweepSettings(check_mapping(SETTINGS, settings_raw, "sweep.", "sweep setting"))

    if not search_raw:
        raise ConfigError(f"{where}: search is empty; give at least one key to sweep")
    search = {key: parse_dist(key, spec, flat) for key, spec in search_raw.items()}
    spec = SweepSpec(base, search, settings, where)
    _check_sweep(spec, flat)
    return spec


def _check_sweep(spec: SweepSpec, flat: dict[str, Any]) -> None:
    s, t = spec.settings, spec.base.train
    if t.val_every == 0:
        raise ConfigError("train.val_every: a sweep needs validations to report; set it > 0")
    if t.val_every > t.steps:
        raise ConfigError(f"train.val_every: {t.val_every} is more than train.steps={t.steps}; "
                          f"trials would never report")
    if s.metric == "val_accuracy" and spec.base.data.source == "sinusoid":
        raise ConfigError("sweep.metric: data.source=sinusoid is regression (no accuracy); "
                          "use val_loss")
    if s.scheduler == "asha" and s.grace_period > spec.max_reports:
        raise ConfigError(f"sweep.grace_period: {s.grace_period} is more than the "
                          f"{spec.max_reports} validations a trial makes "
                          f"(train.steps / train.val_every)")
    if (spec.base.train.device == "cuda" and spec.base.dist.workers == 0
            and not s.trial_gpus):
        raise ConfigError("sweep.trial_gpus: train.device=cuda with dist.workers=0 needs a GPU "
                          "for each trial; set sweep.trial_gpus >= 1 (or a fraction)")
    for i, point in enumerate(s.points_to_evaluate):
        where = f"sweep.points_to_evaluate[{i}]"
        if not isinstance(point, dict) or not point:
            raise ConfigError(f"{where}: expected a mapping of swept key -> value")
        for key, value in flatten(point).items():
            if key not in spec.search:
                raise ConfigError(f"{where}.{key}: not a swept key (swept: "
                                  f"{', '.join(spec.search)})")
            if not spec.search[key].contains(value):
                raise ConfigError(f"{where}.{key}: {value!r} is outside "
                                  f"{spec.search[key].describe()}")
            try:
                resolve(flat, {key: value})
            except ConfigError as e:
                raise ConfigError(f"{where}.{key}: {e}") from None
