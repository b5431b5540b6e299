"""Bad input about data, through the CLI: one table of commands that must be refused.

Every row runs one `amfs` command on a small setup and expects its exit code, one stderr line
`amfs: error: ...` naming the path or key, no traceback, and nothing written or deleted:
the listing of the test's folder (names, sizes, modification times) is the same before and
after. Rows marked `subprocess` run `python -m amfs_dist` with a timeout (a hang fails them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from amfs_dist.cli import main as amfs
from amfs_dist.data.store import write_store
from helpers import GLYPHS, class_marked_set, cub_tree, lake_tree, mini_imagenet_tree

TRAIN = ["data.ways=3", "data.shots=1", "data.queries=2", "model.width=8", "train.steps=2",
         "train.meta_batch=2", "train.val_every=0", "eval.episodes=2", "eval.queries=2",
         "eval.batch=2"]


def store(tmp: Path, name: str = "store", per_class: int = 5, splits=(6, 3, 3)) -> Path:
    path = tmp / name
    data = class_marked_set(classes=sum(splits), per_class=per_class, shape=(1, 8, 8),
                            splits=splits)
    write_store(path, data, source="unit", split_name="fixed")
    return path


def edit_manifest(path: Path, **fields) -> Path:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(fields)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def edit_labels(path: Path, column: pa.Array) -> Path:
    """Rewrite data.arrow with another label column (schema metadata kept)."""
    table = pa.ipc.open_file(pa.py_buffer((path / "data.arrow").read_bytes())).read_all()
    table = table.set_column(1, pa.field("label", column.type), column)
    with pa.OSFile(str(path / "data.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=len(table))
    return path


def user_folder(tmp: Path) -> Path:
    (tmp / "U" / "sub").mkdir(parents=True)
    (tmp / "U" / "thesis.txt").write_text("notes")
    (tmp / "U" / "sub" / "results.csv").write_text("data")
    return tmp / "U"


def src(tmp: Path) -> Path:
    return lake_tree(tmp / "SRC", per_class=2)


def with_fifo(tmp: Path) -> Path:
    root = src(tmp)
    os.mkfifo(root / "images_background" / "Beta" / "character01" / "09.png")
    return root


def secret(tmp: Path, name: str = "photo.jpg") -> Path:
    """An image outside --src (tmp/secret/NAME) that a list or a symlink may point at."""
    (tmp / "secret").mkdir(exist_ok=True)
    path = tmp / "secret" / name
    path.write_bytes(GLYPHS[0])  # a PNG whatever the suffix: PIL reads it by its content
    return path


def mini_imagenet_naming(tmp: Path, filename: str) -> Path:
    """A mini-ImageNet --src whose train.csv names `filename` on line 2."""
    root = mini_imagenet_tree(tmp / "SRC", per_class=1)
    lines = (root / "train.csv").read_text().splitlines()
    lines[1] = f"{filename},{lines[1].split(',')[1]}"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def mini_imagenet_with_symlink(tmp: Path) -> Path:
    root = mini_imagenet_tree(tmp / "SRC", per_class=1)
    image = root / "images" / (root / "train.csv").read_text().splitlines()[1].split(",")[0]
    image.unlink()
    image.symlink_to(secret(tmp))
    return root


def cub_naming(tmp: Path, rel_path: str) -> Path:
    """A CUB --src whose images.txt names `rel_path` on line 1."""
    root = cub_tree(tmp / "CUB", per_class=1)
    lines = (root / "images.txt").read_text().splitlines()
    lines[0] = f"{lines[0].split()[0]} {rel_path}"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    return root


def cub_box(tmp: Path, box: str) -> Path:
    """A CUB --src whose bounding_boxes.txt gives image 1 the box `box`."""
    root = cub_tree(tmp / "CUB", per_class=1)
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = f"1 {box}"
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    return root


def lake_with_symlinked_glyph(tmp: Path) -> Path:
    root = src(tmp)
    glyph = root / "images_background" / "Beta" / "character01" / "00.png"
    glyph.unlink()
    glyph.symlink_to(secret(tmp, "glyph.png"))
    return root


def prepare(*args) -> list[str]:
    return ["data", "prepare", "omniglot", "--split", "lake", *map(str, args)]


def train(tmp: Path, source: Path, *overrides: str) -> list[str]:
    return ["train", "--no-progress", "--out", str(tmp / "run"), f"data.source={source}",
            *TRAIN, *overrides]


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # builds the setup under tmp, returns the command
    names: tuple[str, ...]  # the message contains each ('{tmp}' is the test's folder)
    rc: int = 2
    subprocess: bool = False


CASES = [
    # --force replaces only a store; --out and --src may not nest
    Case("force-on-a-user-folder",
         lambda t: prepare("--src", src(t), "--out", user_folder(t), "--force"),
         ("{tmp}/U", "not an amfs data store", "nothing was deleted")),
    Case("force-out-is-src", lambda t: prepare("--src", src(t), "--out", t / "SRC", "--force"),
         ("--out {tmp}/SRC", "--src {tmp}/SRC")),
    Case("out-inside-src", lambda t: prepare("--src", src(t), "--out", t / "SRC" / "store"),
         ("--out {tmp}/SRC/store", "inside")),
    Case("src-inside-out",
         lambda t: prepare("--src", lake_tree(user_folder(t) / "src"), "--out", t / "U",
                           "--force"), ("--src {tmp}/U/src is inside --out {tmp}/U",)),
    Case("force-on-a-store-holding-a-user-file",
         lambda t: (store(t).joinpath("notes.txt").write_text("mine"),
                    prepare("--src", src(t), "--out", t / "store", "--force"))[1],
         ("{tmp}/store", "notes.txt")),
    Case("force-on-a-foreign-manifest",
         lambda t: prepare("--src", src(t), "--out", edit_manifest(store(t), format="other"),
                           "--force"), ("{tmp}/store", "manifest.json")),
    Case("force-on-a-file",
         lambda t: ((t / "out").write_text("x"),
                    prepare("--src", src(t), "--out", t / "out", "--force"))[1],
         ("--out {tmp}/out is not a folder",)),
    Case("existing-out-without-force",
         lambda t: prepare("--src", src(t), "--out", store(t)), ("{tmp}/store", "--force")),
    # a FIFO named *.png must not hang prepare
    Case("fifo-named-png", lambda t: prepare("--src", with_fifo(t), "--out", t / "out"),
         ("{tmp}/SRC/images_background/Beta/character01/09.png", "not a regular file"),
         subprocess=True),
    # paths from lists and symlinks stay inside --src (resolved)
    Case("mini-imagenet-csv-names-an-absolute-path",
         lambda t: ["data", "prepare", "mini-imagenet", "--out", str(t / "out"), "--src",
                    str(mini_imagenet_naming(t, str(secret(t))))],
         ("{tmp}/SRC/train.csv, line 2", "{tmp}/secret/photo.jpg", "outside --src")),
    Case("mini-imagenet-csv-names-a-path-above-src",
         lambda t: (secret(t), ["data", "prepare", "mini-imagenet", "--out", str(t / "out"),
                                "--src", str(mini_imagenet_naming(t, "../../secret/photo.jpg"))])[1],
         ("{tmp}/SRC/train.csv, line 2", "outside --src")),
    Case("mini-imagenet-image-symlinked-outside-src",
         lambda t: ["data", "prepare", "mini-imagenet", "--out", str(t / "out"), "--src",
                    str(mini_imagenet_with_symlink(t))],
         ("{tmp}/SRC/train.csv, line 2", "outside --src", "{tmp}/secret/photo.jpg")),
    Case("cub-images-txt-names-a-path-above-src",
         lambda t: (secret(t), ["data", "prepare", "cub", "--out", str(t / "out"), "--src",
                                str(cub_naming(t, "../../secret/photo.jpg"))])[1],
         ("{tmp}/CUB/images.txt, line 1", "outside --src")),
    Case("cub-bounding-box-of-nan",
         lambda t: ["data", "prepare", "cub", "--bbox-crop", "--out", str(t / "out"), "--src",
                    str(cub_box(t, "nan 0 10 16"))],
         ("{tmp}/CUB/bounding_boxes.txt", "bad box for image id 1")),
    Case("omniglot-glyph-symlinked-outside-src",
         lambda t: prepare("--src", lake_with_symlinked_glyph(t), "--out", t / "out"),
         ("Beta/character01/00.png", "outside --src", "{tmp}/secret/glyph.png")),
    # manifests and tables that are not what a store holds
    Case("manifest-image-shape-not-integers",
         lambda t: ["data", "info", str(edit_manifest(store(t), image_shape=["1", 8, 8]))],
         ("{tmp}/store/manifest.json", "'image_shape'")),
    Case("manifest-image-shape-negative",
         lambda t: ["data", "info", str(edit_manifest(store(t), image_shape=[-1, -8, 8]))],
         ("{tmp}/store/manifest.json", "'image_shape'")),
    Case("manifest-num-classes-float",
         lambda t: ["data", "info", str(edit_manifest(store(t), num_classes=12.5))],
         ("{tmp}/store/manifest.json", "'num_classes'")),
    Case("manifest-num-classes-negative",
         lambda t: ["data", "info", str(edit_manifest(store(t), num_classes=-1))],
         ("{tmp}/store/manifest.json", "'num_classes'")),
    Case("manifest-splits-empty-list",
         lambda t: ["data", "info", str(edit_manifest(store(t), splits=[]))],
         ("{tmp}/store/manifest.json", "'splits'")),
    Case("manifest-image-shape-permuted",
         lambda t: ["data", "info", str(edit_manifest(store(t), image_shape=[8, 1, 8]))],
         ("{tmp}/store", "image_shape", "schema metadata")),
    Case("label-column-of-strings",
         lambda t: ["data", "info", str(edit_labels(store(t), pa.array(["0"] * 60)))],
         ("{tmp}/store/data.arrow", "'label'")),
    Case("label-column-with-nulls",
         lambda t: ["data", "info", str(edit_labels(store(t), pa.array(
             [None] + [i // 5 for i in range(1, 60)], pa.int64())))],
         ("{tmp}/store/data.arrow", "'label'")),
    Case("train-on-a-bad-manifest",
         lambda t: train(t, edit_manifest(store(t), splits=[])),
         ("{tmp}/store/manifest.json", "'splits'")),
    Case("train-on-a-label-column-with-nulls",
         lambda t: train(t, edit_labels(store(t), pa.array([None] * 60, pa.int64()))),
         ("{tmp}/store/data.arrow", "'label'")),
    # what would fail mid-run is refused before the run folder is made
    Case("data-queries-above-the-images-of-a-class",
         lambda t: train(t, store(t), "data.queries=5"),
         ("data.queries=5", "'train'", "has 5", "at most data.queries=4")),
    Case("eval-queries-too-large-for-the-test-split",
         lambda t: train(t, store(t), "eval.queries=9"), ("eval.queries=9", "'test'")),
    Case("eval-queries-too-large-for-the-val-split",
         lambda t: train(t, store(t), "train.val_every=1", "eval.queries=9"),
         ("eval.queries=9", "'val'")),
    Case("empty-val-split-with-validation",
         lambda t: train(t, store(t, splits=(6, 0, 3)), "train.val_every=1"),
         ("split 'val' has no classes", "train.val_every=1")),
    Case("absurd-meta-batch",
         lambda t: train(t, store(t), "train.meta_batch=1000000000000"),
         ("train.meta_batch=1000000000000", "GiB")),
]


def listing(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_input_is_one_line_and_changes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would show in the listing too
    monkeypatch.setenv("AMFS_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    argv = case.argv(work)
    before = listing(tmp_path)
    if case.subprocess:
        done = subprocess.run([sys.executable, "-m", "amfs_dist", *argv], capture_output=True,
                              text=True, timeout=120)
        rc, out, err = done.returncode, done.stdout, done.stderr
    else:
        rc = amfs(argv)
        out, err = capsys.readouterr()
    assert rc == case.rc, err
    assert "Traceback" not in out + err
    assert err.startswith("amfs: error: ") and err.count("\n") == 1, err
    for name in case.names:
        assert name.format(tmp=work) in err, err
    assert listing(tmp_path) == before
