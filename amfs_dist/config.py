"""The run configuration: one schema, YAML files and dotted key=value overrides, strict validation.

Every key lives in SCHEMA with its type, default and rule; errors name the key and the value.
Key, check_value and check_mapping are the schema mechanism of every file amfs reads: run
configs here, sweep files (tune/space.py) and experiment files (experiment/spec.py).
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from amfs_dist.algorithms.heads import HEADS, INNER_LOOPS, PRESETS
from amfs_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names both."""


@dataclass(frozen=True)
class Key:
    """One key of a schema: its type (bool, int, float, str, list or dict), its default (the
    only place the default is stated), a check with the rule it enforces, and whether null is
    allowed."""

    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    nullable: bool = False


def _positive(v): return v > 0
def _non_negative(v): return v >= 0
def _at_least_one(v): return v >= 1
def _one_of(*options): return lambda v: v in options


# Ray places each bundle (a driver, a worker) on one node: more than this per bundle is a typo
# (1e6 for 1), and Ray itself refuses fractional quantities above 1.
MAX_CPUS = 1024
MAX_GPUS = 64
# a placement group holds one bundle per worker; more workers than this is a typo, not a cluster
MAX_WORKERS = 4096


def resource_key(default: float, most: int, positive: bool = False) -> Key:
    """A CPU or GPU amount for one bundle: finite, >= 0 (> 0 if positive), at most `most`,
    and a whole number above 1, as Ray requires."""
    def ok(v: float) -> bool:
        return (v > 0 or not positive and v == 0) and v <= most and (v <= 1 or v.is_integer())
    return Key((float,), default, ok,
               f"{'> 0' if positive else '>= 0'}, <= {most} and a whole number above 1")


def placement_bundles(cpus: float, gpus: float, dist) -> list[dict[str, float]]:
    """A training driver's placement group (a Tune trial, an experiment cell): its own bundle,
    then one per distributed worker (dist.cpus_per_worker / gpus_per_worker). The collective
    exchange's workers are Ray Train's, in a placement group Ray Train makes: its driver's
    bundle only."""
    driver = {"CPU": float(cpus)}
    if gpus:
        driver["GPU"] = float(gpus)
    if dist.exchange == "collective":
        return [driver]
    worker = {"CPU": float(dist.cpus_per_worker)}
    if dist.gpus_per_worker:
        worker["GPU"] = float(dist.gpus_per_worker)
    return [driver] + [dict(worker) for _ in range(dist.workers)]


def path_label(v: str) -> bool:
    """A name that becomes one folder name: letters, digits and . _ + -, not starting with a
    dot (so never '..', never a path)."""
    return re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,99}", v) is not None


PATH_LABEL_RULE = "a name of letters, digits and . _ + - (not starting with '.', at most 100)"


# Keys whose default depends on the method: null (their schema default) means the method's
# value from PRESETS, else the value here.
METHOD_DEFAULTS = {"kernel.type": "rbf", "kernel.normalize": True, "kernel.mu": 0.05,
                   "kernel.gamma": 0.01, "kernel.learn_lam": False}

SCHEMA: dict[str, Key] = {
    "seed": Key((int,), 0, _non_negative, ">= 0"),
    # checked against the live registry: heads.register() may add methods and heads
    "method": Key((str,), "amfs", lambda v: v in PRESETS, "one of " + ", ".join(PRESETS)),
    "inner": Key((str,), None, lambda v: v in HEADS, "one of " + ", ".join(INNER_LOOPS), True),
    "outer.weighting": Key((str,), None, _one_of("cosine", "mean"), "cosine or mean", True),
    "outer.normalize": Key((str,), "clip", _one_of("clip", "softmax"), "clip or softmax"),
    "outer.temperature": Key((float,), 1.0, _positive, "> 0"),
    # which gradient coordinates the O-AMFS cosines come from (algorithms/outer.py)
    "outer.agreement": Key((str,), "all", _one_of("all", "last_block"), "all or last_block"),
    "data.source": Key((str,), "synthetic", None),
    "data.ways": Key((int,), 5, _at_least_one, ">= 1"),
    "data.shots": Key((int,), 1, _at_least_one, ">= 1"),
    "data.queries": Key((int,), 15, _at_least_one, ">= 1"),
    # a share of each step's training tasks made conflicting (data/conflict.py), for `stability`
    "data.conflict_fraction": Key((float,), 0.0, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "data.conflict": Key((str,), "permute", _one_of("permute", "noise"), "permute or noise"),
    "data.image_size": Key((int,), None, _at_least_one, ">= 1 (or null for the source's own)", True),
    "data.channels": Key((int,), None, _one_of(1, 3), "1 or 3 (or null for the source's own)", True),
    "model.backbone": Key((str,), "auto", _one_of("auto", "conv4", "resnet12", "mlp"),
                          "auto, conv4, resnet12 or mlp"),
    "model.width": Key((int,), None, _at_least_one, ">= 1 (or null for the backbone's own)", True),
    "kernel.type": Key((str,), None, _one_of("rbf", "linear"), "rbf or linear", True),
    "kernel.bandwidth": Key((float,), 1.0, _positive, "> 0"),
    "kernel.lam": Key((float,), 0.1, _positive, "> 0"),
    "kernel.mu": Key((float,), None, _non_negative, ">= 0", True),
    "kernel.gamma": Key((float,), None, _non_negative, ">= 0", True),
    "kernel.normalize": Key((bool,), None, nullable=True),
    "kernel.learn_bandwidth": Key((bool,), True),
    "kernel.learn_lam": Key((bool,), None, nullable=True),
    "kernel.first_order": Key((bool,), False),
    "maml.steps": Key((int,), 5, _at_least_one, ">= 1"),
    "maml.lr": Key((float,), 0.4, _positive, "> 0"),
    "maml.test_steps": Key((int,), 10, _non_negative, ">= 0 (0: the meta-learned init as is)"),
    # MetaOptNet's SVM (inner=svm): the soft-margin constant and the dual solver's steps
    "svm.c": Key((float,), 0.1, _positive, "> 0"),
    "svm.steps": Key((int,), 30, _at_least_one, ">= 1"),
    "train.steps": Key((int,), 200, _non_negative, ">= 0"),
    "train.meta_batch": Key((int,), 8, _at_least_one, ">= 1"),
    "train.lr": Key((float,), 2e-3, _positive, "> 0"),
    "train.val_every": Key((int,), 50, _non_negative, ">= 0 (0: never)"),
    "train.val_episodes": Key((int,), 100, _at_least_one, ">= 1"),
    "train.checkpoint_every": Key((int,), 50, _at_least_one, ">= 1"),
    "train.log_every": Key((int,), 10, _at_least_one, ">= 1"),
    "train.max_bad_steps": Key((int,), 10, _at_least_one, ">= 1"),
    "train.device": Key((str,), "auto", _one_of("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    "train.precision": Key((str,), "fp32", _one_of("fp32", "bf16"), "fp32 or bf16"),
    # tasks per vmapped chunk: bounds the memory of the per-task pass (0: all tasks at once)
    "train.task_chunk": Key((int,), 0, _non_negative, ">= 0 (0: all tasks in one pass)"),
    # bitwise the same parameters for any dist.workers and dist.exchange (one task per vmapped
    # chunk, one thread, deterministic kernels, sums in a fixed order): slower
    "train.deterministic": Key((bool,), False),
    "dist.workers": Key((int,), 0, lambda v: 0 <= v <= MAX_WORKERS,
                        f">= 0 and <= {MAX_WORKERS} (0: in-process)"),
    "dist.gpus_per_worker": resource_key(0.0, MAX_GPUS),
    "dist.cpus_per_worker": resource_key(1.0, MAX_CPUS, positive=True),
    "dist.exchange": Key((str,), "exact", _one_of("exact", "sketch", "collective"),
                         "exact, sketch or collective"),
    # collective exchange: what the driver's O-AMFS weights come from
    "dist.weights_from": Key((str,), "exact", _one_of("exact", "sketch"), "exact or sketch"),
    # coordinates per block: the collective exchange splits the parameters among its workers
    # in whole blocks, and the deterministic mode sums the Gram matrix block by block
    "dist.block_size": Key((int,), 262144, _at_least_one, ">= 1"),
    # cosines from count sketches are off by ~sqrt(2/d): 0.016 at 8192 (distributed/sketch.py)
    "dist.sketch_dim": Key((int,), 8192, _at_least_one, ">= 1"),
    "dist.max_worker_restarts": Key((int,), 3, _non_negative, ">= 0"),
    # seconds a shard worker may take to start or to answer one step before it is replaced
    "dist.timeout_s": Key((float,), 600.0, _positive, "> 0"),
    # seconds a replacement worker may wait for a node with room for it (a lost node's workers
    # wait for another node) before the run stops with its checkpoint
    "dist.replace_timeout_s": Key((float,), 60.0, _positive, "> 0"),
    # elastic runs: go on with at least this many workers when a lost one's replacement finds
    # no room, and grow back when capacity returns (0: dist.workers, not elastic)
    "dist.min_workers": Key((int,), 0, _non_negative, ">= 0 (0: dist.workers)"),
    # collective exchange: where Ray Train keeps its checkpoints (null: the run's ray-train/
    # folder); every node must reach it when the ranks span nodes (shared disk, s3://, gs://)
    "dist.storage_path": Key((str,), None, nullable=True),
    "eval.episodes": Key((int,), 600, _at_least_one, ">= 1"),
    "eval.queries": Key((int,), 15, _at_least_one, ">= 1"),
    "eval.batch": Key((int,), 50, _at_least_one, ">= 1"),
    # test-time fine-tuning of the encoder on the support set (docs/algorithm.md)
    "eval.finetune_steps": Key((int,), 0, _non_negative, ">= 0 (0: the meta-learned encoder as is)"),
    "eval.finetune_lr": Key((float,), 0.01, _positive, "> 0"),
    "eval.finetune_params": Key((str,), "all", _one_of("all", "last"), "all or last"),
}


class AliasError(yaml.composer.ComposerError):
    pass


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a few hundred bytes of nested aliases
    ("billion laughs") expand to gigabytes, and a config never needs them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasError(None, None, "anchors and aliases (&name, *name) are not allowed",
                             event.start_mark)
        return super().compose_node(parent, index)


class NoAliasDumper(yaml.SafeDumper):
    """yaml.SafeDumper that writes a repeated object out again instead of as an alias, so
    that what this project writes, NoAliasLoader reads back."""

    def ignore_aliases(self, data):
        return True


def dump_yaml(obj: Any, **options) -> str:
    return yaml.dump(obj, Dumper=NoAliasDumper, **options)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, as yaml.safe_load without aliases; errors are YAMLError."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)
    except RecursionError:  # thousands of nested brackets
        raise yaml.YAMLError("nested too deeply") from None


# the float forms people write; YAML 1.1 reads 1e-3 or +1E3 (no dot) as strings
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def check_value(name: str, spec: Key, value: Any) -> Any:
    """`value` checked against `spec` (numbers given as text read, ints made floats where the
    key is a float); a ConfigError naming `name` and the value otherwise."""
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{name}: null is not allowed")
    if bool in spec.types:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {shown(value)}")
    elif float in spec.types:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{name}: expected a finite number, got {shown(value)}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {shown(value)}")
    elif int in spec.types:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {shown(value)}")
    elif str in spec.types:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {shown(value)}")
    elif list in spec.types:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {shown(value)}")
    elif dict in spec.types:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {shown(value)}")
    if spec.check is not None and not spec.check(value):
        raise ConfigError(f"{name}: must be {spec.rule}, got {shown(value)}")
    return value


def shown(value: Any, most: int = 80) -> str:
    """A value as an error shows it: its repr, cut to `most` characters."""
    text = repr(value)
    return text if len(text) <= most else text[:most] + "..."


def printable(key: Any, most: int = 80) -> str:
    """A user's key or name as an error shows it: escaped if it holds control characters, cut
    to `most` characters."""
    text = str(key) if str(key).isprintable() else repr(str(key))
    return text if len(text) <= most else text[:most] + "..."


def check_mapping(schema: dict[str, Key], given: dict[str, Any], prefix: str = "",
                  what: str = "config key") -> dict[str, Any]:
    """Every key of `schema`: its default, or its value in `given` (flat, dotted), checked.
    A key not in `schema` is an error; errors name prefix + key."""
    for key in given:
        if key not in schema:
            raise ConfigError(f"{prefix}{printable(key)}: unknown {what}")
    values = {k: copy.deepcopy(spec.default) for k, spec in schema.items()}
    values.update(given)
    return {k: check_value(prefix + k, spec, values[k]) for k, spec in schema.items()}


def flatten_as(tree: dict, schema: dict[str, Key], prefix: str = "") -> dict[str, Any]:
    """A nested mapping -> dotted keys, stopping at the keys of `schema` (whose own values may
    be mappings: an experiment file's base, a sweep's search)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if (key not in schema and isinstance(v, dict)
                and any(s.startswith(key + ".") for s in schema)):
            flat.update(flatten_as(v, schema, key + "."))
        else:
            flat[key] = v
    return flat


def flatten(tree: dict, prefix: str = "", source: str = "config") -> dict[str, Any]:
    """Nested mapping -> {dotted key: value}."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + ".", source))
        else:
            flat[key] = v
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class Values:
    """Checked values of a schema, read-only: v["train.steps"] or v.train.steps."""

    def __init__(self, values: dict[str, Any], effective: dict[str, Any] | None = None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_effective", dict(values) if effective is None else effective)

    def __getitem__(self, key: str) -> Any:
        return self._effective[key]

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_effective")
        if name in values:
            return values[name]
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
        if not sub:
            raise AttributeError(name)
        return Values(sub)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def to_flat(self) -> dict[str, Any]:
        return dict(self._values)

    def to_dict(self) -> dict:
        return unflatten(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._values!r})"


class Config(Values):
    """A validated config; read values as cfg["kernel.lam"] or cfg.kernel.lam.

    Reads give effective values: a key left null that the method decides (inner,
    outer.weighting, METHOD_DEFAULTS) reads as the method's value; to_flat() keeps the nulls,
    so that replace(method=...) and a saved config.yaml still follow the method.
    """

    def __init__(self, values: dict[str, Any]):
        preset = method_preset(values.get("method"))
        super().__init__(values, {k: v if v is not None else preset.get(k, METHOD_DEFAULTS.get(k))
                                  for k, v in values.items()})

    def replace(self, **dotted: Any) -> Config:
        """A copy with dotted overrides, validated (pass keys as {'kernel.lam': 1.0})."""
        return resolve(self.to_flat(), dotted)

    @property
    def inner_loop(self) -> str:
        return self["inner"]

    @property
    def outer_weighting(self) -> str:
        return self["outer.weighting"]

    @property
    def method_name(self) -> str:
        """The preset with this inner loop, outer weighting and kernel type, else 'inner+outer'
        (the inner loop named 'linear-kernel' for kernel.type=linear)."""
        def identity(get) -> tuple:
            inner = get("inner")
            return inner, get("outer.weighting"), get("kernel.type") if inner == "kernel" else None

        mine = identity(self.__getitem__)
        for name in PRESETS:
            preset = {**METHOD_DEFAULTS, **method_preset(name)}
            if identity(preset.get) == mine:
                return name
        inner = "linear-kernel" if mine[2] == "linear" else mine[0]
        return f"{inner}+{mine[1]}"

    @property
    def backbone(self) -> str:
        b = self._values["model.backbone"]
        if b == "auto":
            return "mlp" if self._values["data.source"] == "sinusoid" else "conv4"
        return b


def method_preset(method: Any) -> dict[str, Any]:
    """What method `method` sets (PRESETS), {} for an unknown one."""
    return cast(dict[str, Any], PRESETS.get(method, {}))


def parse_override(text: str) -> tuple[str, Any]:
    """'kernel.lam=0.5' -> ('kernel.lam', 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else None
    except AliasError as e:
        raise ConfigError(f"{printable(key)}: {e.problem}") from None
    except yaml.YAMLError:  # e.g. "a: b" or "[1": taken as the text itself
        value = raw
    return key, value


def resolve(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    for key in base:  # the file's unknown key is named before an override's
        if key not in SCHEMA:
            raise ConfigError(f"{printable(key)}: unknown config key")
    values = check_mapping(SCHEMA, {**base, **overrides})
    cfg = Config(values)
    if cfg.backbone == "mlp" and values["data.source"] != "sinusoid":
        raise ConfigError(f"model.backbone: mlp is for data.source=sinusoid, got "
                          f"data.source={values['data.source']!r}")
    if values["data.source"] == "sinusoid" and cfg.backbone != "mlp":
        raise ConfigError(f"model.backbone: data.source=sinusoid needs mlp, got {cfg.backbone!r}")
    if values["data.conflict_fraction"] > 0 and (values["data.source"] == "sinusoid"
                                                 or values["data.ways"] < 2):
        raise ConfigError(f"data.conflict_fraction: conflicting tasks relabel classes; they need "
                          f"classification with data.ways >= 2, got "
                          f"{values['data.conflict_fraction']!r}")
    if values["outer.agreement"] == "last_block" and (values["dist.exchange"] != "exact"
                                                      or values["train.deterministic"]):
        # those paths hand the weigher sketches or a Gram matrix of the whole gradient
        raise ConfigError(f"outer.agreement: last_block needs the full task gradients "
                          f"(dist.exchange=exact, train.deterministic=false), got "
                          f"dist.exchange={values['dist.exchange']}, "
                          f"train.deterministic={str(values['train.deterministic']).lower()}")
    if values["data.source"] == "sinusoid" and HEADS[cfg.inner_loop].classification_only:
        key = "inner" if values["inner"] else "method"
        raise ConfigError(f"{key}: {values[key]} classifies; data.source=sinusoid is regression")
    return cfg


PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_files(folder: str) -> dict[str, Path]:
    """The YAML files shipped with the package in amfs_dist/FOLDER/, by name (no suffix)."""
    return {p.stem: p for p in sorted((PACKAGE_DIR / folder).glob("*.yaml"))}


def find_file(given: str | Path, folder: str, what: str) -> Path:
    """The file a user names: a path, else a file shipped in amfs_dist/FOLDER/ named NAME,
    NAME.yaml or FOLDER/NAME.yaml (as a checkout's command lines write it)."""
    path = Path(given)
    if path.exists():
        return path
    shipped = shipped_files(folder)
    if path.parent in (Path("."), Path(folder)) and path.name.removesuffix(".yaml") in shipped:
        return shipped[path.name.removesuffix(".yaml")]
    raise ConfigError(f"{what} {printable(given)}: not found (a path, or one of the shipped "
                      f"files: {', '.join(shipped)})")


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file that must hold a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file <- key=value overrides, validated."""
    base = flatten(read_yaml_mapping(path)) if path is not None else {}
    if isinstance(overrides, dict):
        extra = dict(overrides)
    else:
        extra = dict(parse_override(o) for o in (overrides or []))
    return resolve(base, extra)


def save_config(cfg: Config, path: str | Path) -> None:
    from amfs_dist.files import write_text
    write_text(path, dump_yaml(cfg.to_dict(), sort_keys=False))
