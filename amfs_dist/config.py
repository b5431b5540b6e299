"""The run configuration: one schema, YAML files and dotted key=value overrides, strict validation.

Every key lives in SCHEMA with its type, default and rule; errors name the key and the value.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from amfs_dist.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names both."""


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    nullable: bool = False


def _positive(v): return v > 0
def _non_negative(v): return v >= 0
def _at_least_one(v): return v >= 1
def _one_of(*options): return lambda v: v in options


# Keys whose default depends on the method: null (their schema default) means the method's
# value from PRESETS, else the value here.
METHOD_DEFAULTS = {"kernel.type": "rbf", "kernel.normalize": True, "kernel.mu": 0.05,
                   "kernel.gamma": 0.01, "kernel.learn_lam": False}
PRESETS = {  # method -> inner loop, outer weighting and any method defaults it changes (DESIGN 1.3)
    "amfs": {"inner": "kernel", "outer.weighting": "cosine"},
    "iamfs": {"inner": "kernel", "outer.weighting": "mean"},
    "oamfs": {"inner": "maml", "outer.weighting": "cosine"},
    "maml": {"inner": "maml", "outer.weighting": "mean"},
    "fomaml": {"inner": "fomaml", "outer.weighting": "mean"},
    "protonet": {"inner": "protonet", "outer.weighting": "mean"},
    # Bertinetto et al. 2019: ridge regression on the raw features, learned lambda and scale
    "r2d2": {"inner": "kernel", "outer.weighting": "mean", "kernel.type": "linear",
             "kernel.normalize": False, "kernel.mu": 0.0, "kernel.gamma": 0.0,
             "kernel.learn_lam": True},
}
INNER_LOOPS = ("kernel", "maml", "fomaml", "protonet")

SCHEMA: dict[str, Key] = {
    "seed": Key((int,), 0, _non_negative, ">= 0"),
    "method": Key((str,), "amfs", _one_of(*PRESETS), "one of " + ", ".join(PRESETS)),
    "inner": Key((str,), None, _one_of(*INNER_LOOPS), "one of " + ", ".join(INNER_LOOPS), True),
    "outer.weighting": Key((str,), None, _one_of("cosine", "mean"), "cosine or mean", True),
    "outer.normalize": Key((str,), "clip", _one_of("clip", "softmax"), "clip or softmax"),
    "outer.temperature": Key((float,), 1.0, _positive, "> 0"),
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
    "dist.workers": Key((int,), 0, _non_negative, ">= 0 (0: in-process)"),
    "dist.gpus_per_worker": Key((float,), 0.0, _non_negative, ">= 0"),
    "dist.cpus_per_worker": Key((float,), 1.0, _positive, "> 0"),
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
    "eval.episodes": Key((int,), 600, _at_least_one, ">= 1"),
    "eval.queries": Key((int,), 15, _at_least_one, ">= 1"),
    "eval.batch": Key((int,), 50, _at_least_one, ">= 1"),
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


def _coerce(key: str, value: Any) -> Any:
    spec = SCHEMA[key]
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{key}: null is not allowed")
    if bool in spec.types:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif float in spec.types:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: expected a finite number, got {value!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif int in spec.types:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif str in spec.types:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    if spec.check is not None and not spec.check(value):
        raise ConfigError(f"{key}: must be {spec.rule}, got {value!r}")
    return value


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


class Config:
    """A validated config; read values as cfg["kernel.lam"] or cfg.kernel.lam.

    Reads give effective values: a key left null that the method decides (inner,
    outer.weighting, METHOD_DEFAULTS) reads as the method's value; to_flat() keeps the nulls,
    so that replace(method=...) and a saved config.yaml still follow the method.
    """

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))
        preset = PRESETS.get(values.get("method"), {})
        effective = {k: v if v is not None else preset.get(k, METHOD_DEFAULTS.get(k))
                     for k, v in values.items()}
        object.__setattr__(self, "_effective", effective)

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
        return Config(sub)

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only; use .replace(key=value)")

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted overrides, validated (pass keys as {'kernel.lam': 1.0})."""
        return resolve(self.to_flat(), dotted)

    def to_flat(self) -> dict[str, Any]:
        return dict(self._values)

    def to_dict(self) -> dict:
        return unflatten(self._values)

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
        for name, preset in PRESETS.items():
            if identity(lambda k: preset.get(k, METHOD_DEFAULTS.get(k))) == mine:
                return name
        inner = "linear-kernel" if mine[2] == "linear" else mine[0]
        return f"{inner}+{mine[1]}"

    @property
    def backbone(self) -> str:
        b = self._values["model.backbone"]
        if b == "auto":
            return "mlp" if self._values["data.source"] == "sinusoid" else "conv4"
        return b

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


def defaults() -> dict[str, Any]:
    return {k: copy.deepcopy(spec.default) for k, spec in SCHEMA.items()}


def parse_override(text: str) -> tuple[str, Any]:
    """'kernel.lam=0.5' -> ('kernel.lam', 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else None
    except AliasError as e:
        raise ConfigError(f"{key}: {e.problem}") from None
    except yaml.YAMLError:  # e.g. "a: b" or "[1": taken as the text itself
        value = raw
    return key, value


def resolve(base: dict[str, Any], overrides: dict[str, Any]) -> Config:
    values = defaults()
    for source in (base, overrides):
        for key, value in source.items():
            if key not in SCHEMA:
                raise ConfigError(f"{key if key.isprintable() else repr(key)}: unknown config key")
            values[key] = value
    for key in SCHEMA:
        values[key] = _coerce(key, values[key])
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
    if values["data.source"] == "sinusoid" and cfg.inner_loop == "protonet":
        key = "inner" if values["inner"] else "method"
        raise ConfigError(f"{key}: protonet classifies (class prototypes); data.source=sinusoid "
                          f"is regression")
    return cfg


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
