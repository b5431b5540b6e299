"""Config loading, overrides and validation errors; the same schema checks sweep and experiment
files."""
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from amfs_dist.cli import main
from amfs_dist.config import SCHEMA, ConfigError, load_config
from amfs_dist.errors import UserError
from amfs_dist.experiment.spec import SPEC_SCHEMA, load_experiment
from amfs_dist.tune.space import SETTINGS, load_sweep


def test_defaults_and_presets():
    cfg = load_config()
    assert (cfg.method, cfg.inner_loop, cfg.outer_weighting) == ("amfs", "kernel", "cosine")
    assert cfg.data.source == "synthetic" and cfg.backbone == "conv4"
    assert load_config(None, ["method=fomaml"]).inner_loop == "fomaml"
    mixed = load_config(None, ["method=maml", "outer.weighting=cosine"])
    assert mixed.method_name == "oamfs"
    assert load_config(None, ["inner=fomaml", "outer.weighting=cosine"]).method_name == "fomaml+cosine"
    assert load_config(None, ["data.source=sinusoid"]).backbone == "mlp"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"kernel": {"lam": 0.5, "mu": 0.2}, "train": {"steps": 7}}))
    cfg = load_config(path, ["kernel.mu=0.3", "kernel.learn_lam=true"])
    assert (cfg.kernel.lam, cfg.kernel.mu, cfg.train.steps, cfg.kernel.learn_lam) == (0.5, 0.3, 7, True)
    assert isinstance(load_config(None, ["kernel.bandwidth=2"]).kernel.bandwidth, float)


def test_round_trip_through_dict():
    cfg = load_config(None, ["seed=3", "outer.normalize=softmax"])
    assert load_config(None, [f"{k}={v}" for k, v in cfg.to_flat().items() if v is not None]
                       ).to_flat() == cfg.to_flat()


BAD = [
    ("kernel.lamda=1", "kernel.lamda", "unknown"),
    ("data.ways=five", "data.ways", "five"),
    ("train.steps=1.5", "train.steps", "1.5"),
    ("kernel.lam=0", "kernel.lam", "0"),
    ("kernel.lam=-1", "kernel.lam", "-1"),
    ("kernel.bandwidth=0", "kernel.bandwidth", "0"),
    ("kernel.mu=-0.1", "kernel.mu", "-0.1"),
    ("kernel.gamma=-2", "kernel.gamma", "-2"),
    ("data.ways=0", "data.ways", "0"),
    ("data.shots=0", "data.shots", "0"),
    ("data.queries=0", "data.queries", "0"),
    ("train.meta_batch=0", "train.meta_batch", "0"),
    ("method=reptile", "method", "reptile"),
    ("kernel.normalize=maybe", "kernel.normalize", "maybe"),
    ("outer.weighting=max", "outer.weighting", "max"),
    ("dist.gpus_per_worker=-0.5", "dist.gpus_per_worker", "-0.5"),
    ("dist.cpus_per_worker=1e9", "dist.cpus_per_worker", "1000000000.0"),
    ("dist.gpus_per_worker=2.5", "dist.gpus_per_worker", "2.5"),
    ("dist.workers=1000000000", "dist.workers", "1000000000"),
]


@pytest.mark.parametrize("override,key,value", BAD)
def test_bad_values_name_key_and_value(override, key, value, capsys, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and value in str(e.value)
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", override])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and key in err and value in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_long_bad_value_is_cut_in_the_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "data.ways=" + "y" * 100_000]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amfs: error: data.ways: expected an integer, got 'yyy")
    assert len(err) < 200 and err.rstrip().endswith("...")


def test_bad_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kernel: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    nested = tmp_path / "unknown.yaml"
    nested.write_text("kernel:\n  sigma: 1.0\n")
    assert main(["train", "--config", str(nested)]) == 2
    assert "kernel.sigma" in capsys.readouterr().err


def test_override_without_equals_is_an_error(capsys):
    assert main(["train", "kernel.lam"]) == 2
    assert "key=value" in capsys.readouterr().err


# -- property: any override or YAML mapping loads or is a one-line ConfigError ------------------
KEY_PARTS = sorted({part for key in SCHEMA for part in key.split(".")})
keys = st.one_of(st.sampled_from(sorted(SCHEMA)), st.sampled_from(KEY_PARTS), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["1e-3", ".inf", "nan", "&a 1", "*a", "[1", "{a: 1}",
                                     "!!python/name:os.system", "2001-12-14", "0x1F", "1_000"]),
                    st.just(10 ** 400))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=8)


def _loads_or_config_error(load):
    try:
        load()
    except UserError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30),
                          st.builds(lambda k, v: f"{k}={v}", keys, st.one_of(scalars, st.text()))),
                max_size=4))
def test_any_override_loads_or_is_a_config_error(overrides):
    _loads_or_config_error(lambda: load_config(None, overrides))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.dictionaries(keys, values, max_size=5), st.text(max_size=60), st.binary(max_size=60)))
def test_any_yaml_file_loads_or_is_a_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    if isinstance(content, dict):
        path.write_text(yaml.safe_dump(content, allow_unicode=True))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _loads_or_config_error(lambda: load_config(path))


def _write_yaml(tmp_path_factory, content) -> str:
    path = tmp_path_factory.mktemp("file") / "f.yaml"
    path.write_text(yaml.safe_dump(content, allow_unicode=True))
    return str(path)


# sweep files: the three sections with config keys, distributions and settings in them
search_entries = st.dictionaries(keys, st.one_of(
    values, st.builds(lambda kind, args: {kind: args},
                      st.sampled_from(["loguniform", "uniform", "randint", "lograndint",
                                       "choice", "normal"]),
                      st.lists(scalars, max_size=3))), max_size=3)
sweep_sections = st.fixed_dictionaries({}, optional={
    "base": st.dictionaries(keys, values, max_size=4),
    "search": search_entries,
    "sweep": st.dictionaries(st.one_of(st.sampled_from(sorted(SETTINGS)), st.text(max_size=8)),
                             values, max_size=4),
    "extra": values})


@settings(max_examples=100, deadline=None)
@given(sweep_sections)
def test_any_sweep_file_loads_or_is_a_config_error(tmp_path_factory, content):
    path = _write_yaml(tmp_path_factory, content)
    _loads_or_config_error(lambda: load_sweep(path))


# experiment files: its own keys (resources nested), config keys under base/grid/variants
SPEC_TOP = sorted({k.split(".")[0] for k in SPEC_SCHEMA})
experiment_files = st.dictionaries(
    st.one_of(st.sampled_from(SPEC_TOP), keys),
    st.one_of(values, st.dictionaries(st.one_of(keys, st.sampled_from(["cpus", "gpus"]),
                                                st.sampled_from(["..", "/abs", "a/b"])),
                                      values, max_size=3)), max_size=5)


@settings(max_examples=100, deadline=None)
@given(experiment_files)
def test_any_experiment_file_loads_or_is_a_config_error(tmp_path_factory, content):
    path = _write_yaml(tmp_path_factory, content)
    _loads_or_config_error(lambda: load_experiment("compare", path).cells())
