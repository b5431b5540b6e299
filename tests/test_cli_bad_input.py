"""Bad input through the CLI: one line naming the file or key, the exit code, no traceback,
and nothing written or deleted. Row ids name the bad input."""
import json
import shutil

import pytest
import torch

from amfs_dist import __version__
from amfs_dist.cli import main
from conftest import TINY as SHARED_TINY
from conftest import PickleThatWritesAFile
from helpers import snapshot, write

# fewer eval episodes and a checkpoint every step: the runs these rows start from are quick
TINY = [*SHARED_TINY, "eval.episodes=3", "train.checkpoint_every=1"]

# 9 levels of 9 aliases to the level above: 9**9 "lol"s once expanded ("billion laughs")
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run), "--no-progress", *TINY, "train.steps=2"]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    """A fresh copy of a finished 2-step run, in tmp_path/run."""
    return shutil.copytree(finished_run, tmp_path / "run")


def truncate(path):
    return write(path, path.read_bytes()[: path.stat().st_size // 2])


def edit_config(run, old, new):
    text = (run / "config.yaml").read_text()
    assert old in text
    write(run / "config.yaml", text.replace(old, new))


def train(tmp, *args):
    return ["train", "--out", str(tmp / "new"), "--no-progress", *TINY, "train.steps=1", *args]


# (id, exit code, setup(tmp, run) -> (argv, text the message must contain))
ROWS = [
    ("unknown-key", 2, lambda t, r: (train(t, "kernel.lamda=1"), "kernel.lamda")),
    ("bad-value", 2, lambda t, r: (train(t, "data.ways=five"), "data.ways")),
    ("lr-nan", 2, lambda t, r: (train(t, "train.lr=nan"), "train.lr")),
    ("lr-inf", 2, lambda t, r: (train(t, "train.lr=.inf"), "train.lr")),
    ("lr-overflows-a-float", 2, lambda t, r: (train(t, "train.lr=1e999"), "train.lr")),
    ("min-workers-above-workers", 2, lambda t, r: (
        train(t, "dist.workers=2", "dist.min_workers=3"), "dist.min_workers=3")),
    ("min-workers-above-workers-collective", 2, lambda t, r: (
        train(t, "dist.workers=2", "dist.min_workers=3", "dist.exchange=collective"),
        "dist.min_workers=3")),
    ("agreement-unknown", 2, lambda t, r: (train(t, "outer.agreement=head"), "outer.agreement")),
    ("agreement-last-block-sketch", 2, lambda t, r: (
        train(t, "outer.agreement=last_block", "dist.workers=2", "dist.exchange=sketch"),
        "dist.exchange=sketch")),
    ("agreement-last-block-deterministic", 2, lambda t, r: (
        train(t, "outer.agreement=last_block", "train.deterministic=true"),
        "train.deterministic=true")),
    ("config-missing", 2, lambda t, r: (train(t, "--config", str(t / "no.yaml")), "no.yaml")),
    ("config-invalid-yaml", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", "kernel: [1, 2\n"))), "c.yaml")),
    ("config-not-a-mapping", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", "- 1\n- 2\n"))), "c.yaml")),
    ("config-is-a-directory", 2, lambda t, r: (train(t, "--config", str(t)), str(t))),
    ("config-not-utf8", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", "kernel:\n  lam: 0.5  # caf\xe9\n"
                                       .encode("latin-1")))), "c.yaml")),
    ("config-alias-bomb", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", ALIAS_BOMB))), "c.yaml")),
    ("config-yaml-anchor", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", "kernel: &k {lam: 0.5}\n"))), "c.yaml")),
    ("override-yaml-alias", 2, lambda t, r: (train(t, "train.lr=&a 1"), "train.lr")),
    ("config-deep-nesting", 2, lambda t, r: (
        train(t, "--config", str(write(t / "c.yaml", "[" * 50000))), "c.yaml")),
    ("out-is-a-user-folder", 2, lambda t, r: (
        ["train", "--out", str(t / "thesis"), "--no-progress", *TINY, "train.steps=1"],
        str(t / "thesis"))),
    ("out-is-a-file", 2, lambda t, r: (
        ["train", "--out", str(write(t / "notes.txt", "notes")), *TINY], "notes.txt")),
    ("out-holds-a-run", 2, lambda t, r: (["train", "--out", str(r), *TINY], str(r))),
    ("resume-not-a-run", 2, lambda t, r: (["train", "--resume", str(t / "nope")], "nope")),
    ("resume-bad-override", 2, lambda t, r: (["train", "--resume", str(r), "train.lr=abc"],
                                             "train.lr")),
    ("resume-changes-width", 2, lambda t, r: (["train", "--resume", str(r), "model.width=64"],
                                            "model.width")),
    ("resume-changes-backbone", 2, lambda t, r: (
        ["train", "--resume", str(r), "model.backbone=resnet12"], "model.backbone")),
    ("resume-changes-inner-loop", 2, lambda t, r: (["train", "--resume", str(r), "method=maml"],
                                                 "inner")),
    ("resume-changes-ways", 2, lambda t, r: (["train", "--resume", str(r), "data.ways=5"],
                                           "data.ways")),
    ("resume-changes-learn-lam", 2, lambda t, r: (
        ["train", "--resume", str(r), "kernel.learn_lam=true"], "kernel.learn_lam")),
    ("resume-edited-config", 2, lambda t, r: (
        edit_config(r, "width: 8", "width: 64") or ["train", "--resume", str(r)],
        "backbone.")),
    ("resume-truncated-checkpoint", 2, lambda t, r: (
        truncate(r / "checkpoint.pt") and ["train", "--resume", str(r)], "checkpoint.pt")),
    ("resume-empty-checkpoint", 2, lambda t, r: (
        write(r / "checkpoint.pt", b"") and ["train", "--resume", str(r)], "checkpoint.pt")),
    ("resume-foreign-checkpoint", 2, lambda t, r: (
        torch.save({"foo": 1}, r / "checkpoint.pt") or ["train", "--resume", str(r)],
        "checkpoint.pt")),
    ("resume-checkpoint-that-runs-code", 2, lambda t, r: (
        torch.save({"model": PickleThatWritesAFile(t / "pwned")}, r / "checkpoint.pt")
        or ["train", "--resume", str(r)], "checkpoint.pt")),
    ("eval-missing-run", 2, lambda t, r: (["eval", str(t / "nope")], "nope")),
    ("eval-bad-episodes", 2, lambda t, r: (["eval", str(r), "--episodes", "0"], "--episodes")),
    ("eval-bad-override", 2, lambda t, r: (["eval", str(r), "eval.batch=0"], "eval.batch")),
    ("eval-truncated-model", 2, lambda t, r: (
        truncate(r / "model.pt") and ["eval", str(r)], "model.pt")),
    ("eval-foreign-model", 2, lambda t, r: (
        torch.save({"foo": 1}, r / "model.pt") or ["eval", str(r)], "model.pt")),
    ("eval-model-bad-input-shape", 2, lambda t, r: (
        torch.save({"model": {}, "input_shape": "big"}, r / "model.pt") or ["eval", str(r)],
        "model.pt")),
    ("eval-model-that-runs-code", 2, lambda t, r: (
        torch.save({"model": PickleThatWritesAFile(t / "pwned"), "input_shape": [1, 28, 28]}, r / "model.pt")
        or ["eval", str(r)], "model.pt")),
    ("eval-config-width-unlike-the-model", 2, lambda t, r: (
        edit_config(r, "width: 8", "width: 64") or ["eval", str(r)], "backbone.")),
    ("eval-config-backbone-unlike-the-model", 2, lambda t, r: (
        edit_config(r, "backbone: auto", "backbone: resnet12") or ["eval", str(r)], "backbone.")),
    ("eval-override-method-unlike-the-model", 2, lambda t, r: (["eval", str(r), "method=maml"], "head.")),
    ("eval-config-not-utf8", 2, lambda t, r: (
        write(r / "config.yaml", (r / "config.yaml").read_bytes() + b"# \xff\n")
        and ["eval", str(r)], "config.yaml")),
    ("svm-c-not-positive", 2, lambda t, r: (train(t, "method=metaoptnet", "svm.c=0"), "svm.c")),
    ("svm-head-on-regression", 2, lambda t, r: (
        train(t, "method=metaoptnet", "data.source=sinusoid"), "method")),
    # run directories: a finished run is kept, only our runs are continued, damage is named
    ("out-finished-run-without-checkpoint", 2, lambda t, r: (
        (r / "checkpoint.pt").unlink() or ["train", "--out", str(r), *TINY, "seed=7"],
        "finished run")),
    ("resume-if-exists-folder-not-ours", 2, lambda t, r: (
        not_ours(t, r) and ["train", "--out", str(t / "mine"), "--resume-if-exists", *TINY,
                            "train.steps=2"], "amfs-run.json")),
    ("resume-if-exists-torn-result", 2, lambda t, r: (
        truncate(r / "result.json") and start_or_continue(r), "result.json")),
    ("resume-if-exists-empty-result", 2, lambda t, r: (
        write(r / "result.json", "") and start_or_continue(r), "result.json")),
    ("resume-if-exists-torn-marker", 2, lambda t, r: (
        truncate(r / "amfs-run.json") and start_or_continue(r), "amfs-run.json")),
    ("status-torn-result", 2, lambda t, r: (
        truncate(r / "result.json") and ["status", str(r)], "result.json")),
    ("status-empty-config", 2, lambda t, r: (
        write(r / "config.yaml", "") and ["status", str(r)], "config.yaml")),
    ("resume-empty-config", 2, lambda t, r: (
        write(r / "config.yaml", "") and ["train", "--resume", str(r)], "config.yaml")),
    ("resume-run-of-a-newer-amfs", 2, lambda t, r: (
        write(r / "amfs-run.json", '{"package": "amfs-dist", "version": "99.0"}')
        and ["train", "--resume", str(r), "train.steps=3"], f"amfs 99.0, newer than this amfs "
                                                             f"{__version__}")),
    ("eval-empty-config", 2, lambda t, r: (
        write(r / "config.yaml", "") and ["eval", str(r)], "config.yaml")),
    ("eval-run-of-a-newer-amfs", 2, lambda t, r: (
        write(r / "amfs-run.json", '{"package": "amfs-dist", "version": "99.0"}')
        and ["eval", str(r)], "newer than this amfs")),
    ("data-source-path-component-too-long", 2, lambda t, r: (
        train(t, "data.source=" + "b" * 100_000), "a path component of 100000 bytes")),
]


def not_ours(tmp, run):
    """A user's folder with a copy of a run's config.yaml and a hand-written result.json."""
    (tmp / "mine").mkdir()
    shutil.copy(run / "config.yaml", tmp / "mine")
    return write(tmp / "mine" / "result.json", '{"test_accuracy": 1.0}\n')


def start_or_continue(run):
    return ["train", "--out", str(run), "--resume-if-exists", *TINY, "train.steps=2"]


@pytest.mark.parametrize("setup,code", [pytest.param(s, c, id=i) for i, c, s in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(setup, code, run, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would show in the snapshot
    (tmp_path / "thesis").mkdir()  # someone's own folder
    write(tmp_path / "thesis" / "config.yaml", "my: notes\n")
    write(tmp_path / "thesis" / "result.json", "{}\n")
    argv, named = setup(tmp_path, run)
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main([str(a) for a in argv]) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amfs: error: "), err
    assert named in lines[0] and len(lines[0]) < 1000  # a long value is cut
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_unsafe_files_are_refused_as_unsafe_without_a_hint_to_load_them_anyway(run, capsys):
    """torch's own message ends by suggesting weights_only=False."""
    for name, argv in (("checkpoint.pt", ["train", "--resume", str(run)]),
                       ("model.pt", ["eval", str(run)])):
        torch.save({"model": PickleThatWritesAFile(run / "pwned"), "input_shape": [1, 28, 28], "step": 1,
                    "bad_streak": 0, "optimizer": {}, "torch_rng": None}, run / name)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(run / name) in err and "unsafe" in err
        assert "weights_only" not in err and len(err.strip().splitlines()) == 1
        assert not (run / "pwned").exists()


def test_alias_bomb_is_refused_at_its_first_anchor(tmp_path, capsys, monkeypatch):
    """A 551-byte file of nested aliases once took 35 s and 855 MB to load: it is refused at
    its first anchor, before any value is built from it."""
    from amfs_dist.config import NoAliasLoader
    composed, built = [], []
    compose, construct = NoAliasLoader.compose_node, NoAliasLoader.construct_object
    monkeypatch.setattr(NoAliasLoader, "compose_node", lambda self, parent, index: (
        composed.append(index), compose(self, parent, index))[1])
    monkeypatch.setattr(NoAliasLoader, "construct_object", lambda self, node, deep=False: (
        built.append(node), construct(self, node, deep))[1])
    bomb = write(tmp_path / "bomb.yaml", ALIAS_BOMB)
    assert main(["train", "--config", str(bomb), "--out", str(tmp_path / "r")]) == 2
    # the document, the key `a`, and its anchored list `&a [...]`, which is refused
    assert len(composed) == 3 and built == []
    assert str(bomb) in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_out_may_be_new_empty_or_an_unfinished_run_of_ours(tmp_path, capsys):
    """Only a non-empty directory that is not ours is refused; ours carry amfs-run.json."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--out", str(empty), "--no-progress", *TINY, "train.steps=1",
                 "eval.episodes=1"]) == 0
    marker = json.loads((empty / "amfs-run.json").read_text())
    assert marker["package"] == "amfs-dist"
    for name in ("checkpoint.pt", "model.pt", "result.json"):  # as if the run had failed
        (empty / name).unlink()                                    # before its first checkpoint
    assert main(["train", "--out", str(empty), "--no-progress", *TINY, "train.steps=1",
                 "eval.episodes=1"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    write(mine / "model.pt", "my own model")
    assert main(["train", "--out", str(mine), *TINY]) == 2
    assert str(mine) in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["model.pt"]


def test_a_failed_resume_leaves_the_run_resumable_and_evaluable(run, capsys):
    """`--resume R model.width=64` used to rewrite config.yaml before failing."""
    config = (run / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress", "model.width=64"]) == 2
    assert "model.width" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=3"]) == 0
    assert json.loads(capsys.readouterr().out)["meta_steps"] == 3
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["test_episodes"] == 2


def test_resume_drops_a_torn_last_metrics_line(run, capsys):
    """A crash mid-write leaves half a row; resume keeps the valid rows."""
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "skipped": false, "loss": 1.0')
    assert main(["train", "--resume", str(run), "--no-progress", "train.steps=3"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "weights" in rows[2]


def test_float_forms_users_write_are_accepted(tmp_path, capsys):
    """YAML 1.1 reads 1e-3 (no dot) as a string."""
    config = write(tmp_path / "c.yaml", "outer:\n  temperature: 2E0\nkernel:\n  mu: +1e-2\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress",
                 *TINY, "train.steps=1", "eval.episodes=1", "train.lr=1e-3", "kernel.lam=.5",
                 "kernel.bandwidth=2.", "kernel.gamma=1E-3"]) == 0
    capsys.readouterr()
    saved = (tmp_path / "r" / "config.yaml").read_text()
    for line in ("lr: 0.001", "lam: 0.5", "bandwidth: 2.0", "gamma: 0.001", "mu: 0.01",
                 "temperature: 2.0"):
        assert line in saved
