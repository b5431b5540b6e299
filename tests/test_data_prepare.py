"""`amfs data prepare` on tiny trees in each data set's standard layout, and every error."""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amfs_dist.cli import main as amfs
from amfs_dist.data.episodes import ImageEpisodeSampler
from amfs_dist.data.prepare.common import split_list
from amfs_dist.data.prepare.omniglot import lake_val_alphabets
from amfs_dist.data.store import open_store, read_manifest
from helpers import GLYPHS, cub_tree, jpeg, lake_tree, mini_imagenet_tree, png, ravi_classes, write

RNG = np.random.default_rng(0)


def prepare(*args) -> int:
    return amfs(["data", "prepare", *map(str, args)])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def assert_fails(capsys, out: Path, *args, message: str, names: str) -> str:
    """prepare fails with exit 2, one stderr line containing message and names, nothing at out."""
    assert prepare(*args, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("amfs: error: ") and err.count("\n") == 1, err
    assert message in err and names in err, err
    assert_nothing_written(out)
    return err


def class_sets(data) -> dict[str, set[str]]:
    return {s: {data.class_names[c] for c in cls} for s, cls in data.splits.items()}


def assert_disjoint(sets: dict[str, set]) -> None:
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b, sets[a] & sets[b])


# --- Omniglot ---------------------------------------------------------------------------

def vinyals_tree(root: Path, per_class: int = 1, skip: str | None = None) -> Path:
    """All 1623 characters of the Vinyals split, background/evaluation as in the real set."""
    evaluation = {a for s, a, _ in split_list("omniglot_vinyals") if s == "test"} | {
        "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez",
        "Glagolitic"}
    for _, alphabet, span in split_list("omniglot_vinyals"):
        folder = root / ("images_evaluation" if alphabet in evaluation else "images_background")
        first, last = (int(x) for x in span.split("-"))
        for c in range(first, last + 1):
            if f"{alphabet}/character{c:02d}" == skip:
                (folder / alphabet / f"character{c:02d}").mkdir(parents=True, exist_ok=True)
                continue
            for k in range(per_class):
                write(folder / alphabet / f"character{c:02d}" / f"{c:04d}_{k:02d}.png",
                      GLYPHS[(c + k) % len(GLYPHS)])
    return root


@pytest.fixture(scope="module")
def vinyals_src(tmp_path_factory) -> Path:
    return vinyals_tree(tmp_path_factory.mktemp("omniglot"), per_class=2)


def test_omniglot_vinyals_split(vinyals_src, tmp_path, capsys):
    assert prepare("omniglot", "--src", vinyals_src, "--out", tmp_path / "s") == 0
    assert "train" in capsys.readouterr().out
    data = open_store(tmp_path / "s")
    sets = class_sets(data)
    assert {s: len(c) for s, c in sets.items()} == {"train": 1028, "val": 172, "test": 423}
    assert_disjoint(sets)
    assert len(sets["train"] | sets["val"]) == 1200  # the Vinyals training characters
    assert "Gurmukhi/character41" in sets["train"] and "Gurmukhi/character42" in sets["test"]
    val_alphabets = {data.groups[c] for c in data.splits["val"]}
    assert val_alphabets == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew",
                             "Mkhedruli_(Georgian)"}
    assert data.image_shape == (1, 28, 28) and len(data.images) == 2 * 1623
    assert set(np.unique(data.images)) - {0, 255}  # antialiased resize made grey levels
    manifest = read_manifest(tmp_path / "s")
    assert manifest["source"] == "omniglot" and manifest["split"] == "vinyals"


def test_omniglot_rotations_are_new_classes_in_the_same_split(vinyals_src, tmp_path):
    out = tmp_path / "rot"
    assert prepare("omniglot", "--src", vinyals_src, "--out", out, "--rotations",
                   "--image-size", "20") == 0
    data = open_store(out)
    sets = class_sets(data)
    assert {s: len(c) for s, c in sets.items()} == {"train": 4112, "val": 688, "test": 1692}
    assert_disjoint(sets)
    base = data.class_names.index("Latin/character03/rot000")
    turned = data.class_names.index("Latin/character03/rot090")
    assert base in data.splits["train"] and turned in data.splits["train"]
    a, b = data.images[data.labels == base], data.images[data.labels == turned]
    assert data.image_shape == (1, 20, 20)
    assert np.array_equal(np.rot90(a, 1, axes=(2, 3)), b)


def test_omniglot_lake_split_by_alphabet(tmp_path):
    src = lake_tree(tmp_path / "src")
    assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake") == 0
    data = open_store(tmp_path / "s")
    groups = {s: {data.groups[c] for c in cls} for s, cls in data.splits.items()}
    assert groups == {"train": {"Alpha", "Beta"}, "val": {"Gamma"}, "test": {"Delta"}}
    assert {s: len(c) for s, c in data.splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert len(data.images) == 8 * 3
    assert read_manifest(tmp_path / "s")["split"] == "lake"


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """`ulimit -f`: the store's data file cannot be written whole."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))
    src, out = lake_tree(tmp_path / "src"), tmp_path / "s"
    done = subprocess.run([sys.executable, "-m", "amfs_dist", "data", "prepare", "omniglot",
                           "--src", str(src), "--out", str(out), "--split", "lake"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and str(out) in lines[0], lines
    assert_nothing_written(out)


@pytest.mark.slow  # two subprocesses
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv")
def test_permission_errors_are_one_line_naming_the_path(tmp_path):
    """Run without root's powers over file modes (setpriv), as a user would be."""
    src = lake_tree(tmp_path / "src")
    alphabet = src / "images_background" / "Alpha"
    (tmp_path / "locked").mkdir(mode=0o555)
    for out, named in ((tmp_path / "s", alphabet), (tmp_path / "locked" / "s", tmp_path / "locked")):
        os.chmod(alphabet, 0 if named == alphabet else 0o755)
        done = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all",
                               sys.executable, "-m", "amfs_dist", "data", "prepare", "omniglot",
                               "--src", str(src), "--out", str(out), "--split", "lake"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Permission denied" in lines[0], lines
        assert lines[0].startswith(f"amfs: error: {named}")
        assert_nothing_written(out)


def test_lake_validation_rule_on_the_standard_background_alphabets():
    background = [a for s, a, _ in split_list("omniglot_vinyals")
                  if s in ("train", "val")][:25] + \
        ["Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"]
    assert len(set(background)) == 30
    assert lake_val_alphabets(background) == {
        "Balinese", "Early_Aramaic", "Inuktitut_(Canadian_Aboriginal_Syllabics)",
        "Mkhedruli_(Georgian)", "Tifinagh"}
    assert lake_val_alphabets(["Only"]) == set()


def test_same_prepare_twice_gives_the_same_content(tmp_path):
    src = lake_tree(tmp_path / "src")
    for out in ("a", "b"):
        assert prepare("omniglot", "--src", src, "--out", tmp_path / out, "--split", "lake") == 0
    assert read_manifest(tmp_path / "a")["content_sha256"] == \
        read_manifest(tmp_path / "b")["content_sha256"]


def test_episodes_from_a_prepared_store_are_deterministic(tmp_path):
    src = lake_tree(tmp_path / "src", per_class=4)
    assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake") == 0
    draws = [ImageEpisodeSampler(open_store(tmp_path / "s"), ways=2, shots=1, queries=3,
                                 seed=3).sample("train", 11, [0, 1, 2, 3]) for _ in range(2)]
    assert all(np.array_equal(getattr(draws[0], k).numpy(), getattr(draws[1], k).numpy())
               for k in ("xs", "ys", "xq", "yq"))


def test_sampler_errors_on_a_prepared_store(tmp_path):
    src = lake_tree(tmp_path / "src", per_class=3)
    assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake") == 0
    data = open_store(tmp_path / "s")
    with pytest.raises(ValueError, match="split .val. has 2 classes, fewer than data.ways=3"):
        ImageEpisodeSampler(data, ways=3, shots=1, queries=1, seed=0)
    sampler = ImageEpisodeSampler(data, ways=2, shots=1, queries=15, seed=0)
    with pytest.raises(ValueError, match=r"class '\w+/character0\d' has 3 images, fewer than "
                                         r"shots \+ queries = 16"):
        sampler.sample("train", 0, [0])


def test_omniglot_missing_folder(tmp_path, capsys):
    src = lake_tree(tmp_path / "src")
    for path in (src / "images_evaluation").rglob("*"):
        if path.is_file():
            path.unlink()
    import shutil
    shutil.rmtree(src / "images_evaluation")
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", src, "--split", "lake",
                 message="folder not found", names=str(src / "images_evaluation"))
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", tmp_path / "absent",
                 message="folder not found", names=str(tmp_path / "absent"))


@pytest.mark.parametrize("bad, message", [
    pytest.param(b"this is not a png", "cannot decode image", id="not-an-image"),
    pytest.param(GLYPHS[0][: len(GLYPHS[0]) // 2], "cannot decode image", id="truncated-png"),
    pytest.param(png(np.zeros((50, 50), np.uint8)), "expected 105x105 pixels", id="wrong-size"),
    pytest.param(png(np.zeros((105, 105, 3), np.uint8)), "expected a greyscale image",
                 id="colour-image"),
])
def test_omniglot_bad_images(tmp_path, capsys, bad, message):
    src = lake_tree(tmp_path / "src")
    bad_file = write(src / "images_background" / "Beta" / "character02" / "01.png", bad)
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", src, "--split", "lake",
                 message=message, names=str(bad_file))


def test_omniglot_character_of_the_split_list_without_images(tmp_path, capsys):
    src = vinyals_tree(tmp_path / "src", skip="Korean/character07")
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", src,
                 message="of the split list amfs_dist/data/splits/omniglot_vinyals.txt has no "
                         "images", names="class 'Korean/character07'")


def test_omniglot_empty_character_folder_in_lake_split(tmp_path, capsys):
    src = lake_tree(tmp_path / "src")
    (src / "images_evaluation" / "Delta" / "character09").mkdir()
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", src, "--split", "lake",
                 message="character folder with no PNG images", names="Delta/character09")


def test_existing_out_is_refused_before_converting(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert prepare("omniglot", "--src", tmp_path / "absent", "--out", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    src = lake_tree(tmp_path / "src")
    # --force replaces a store, never a folder of the user's
    assert prepare("omniglot", "--src", src, "--out", out, "--split", "lake", "--force") == 2
    assert "is not an amfs data store (it holds 'keep.txt')" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    store = tmp_path / "store"
    assert prepare("omniglot", "--src", src, "--out", store, "--split", "lake") == 0
    first = read_manifest(store)["content_sha256"]
    assert prepare("omniglot", "--src", src, "--out", store, "--split", "lake", "--force",
                   "--image-size", "14") == 0
    assert sorted(p.name for p in store.iterdir()) == ["data.arrow", "manifest.json"]
    assert read_manifest(store)["content_sha256"] != first


def test_options_that_do_not_apply_are_refused(tmp_path, capsys):
    assert_fails(capsys, tmp_path / "out", "cub", "--src", tmp_path / "src", "--rotations",
                 message="--rotations does not apply to cub", names="cub")
    assert_fails(capsys, tmp_path / "out", "cifar-fs", "--src", tmp_path / "src", "--bbox-crop",
                 message="--bbox-crop does not apply to cifar-fs", names="cifar-fs")
    assert_fails(capsys, tmp_path / "out", "omniglot", "--src", tmp_path / "src", "--image-size", "0",
                 message="--image-size must be >= 1", names="0")


# --- mini-ImageNet ----------------------------------------------------------------------


def test_mini_imagenet_from_csv(tmp_path, capsys):
    src = mini_imagenet_tree(tmp_path / "src")
    write(src / "images" / "n9999999900000000.jpg", jpeg(np.zeros((8, 8, 3), np.uint8)))
    with open(src / "train.csv", "a") as f:  # a class outside the Ravi split: skipped, warned
        f.write("n9999999900000000.jpg,n99999999\n")
    assert prepare("mini-imagenet", "--src", src, "--out", tmp_path / "s") == 0
    assert "1 class(es) in" in capsys.readouterr().err
    data = open_store(tmp_path / "s")
    sets = class_sets(data)
    assert {s: sorted(c) for s, c in sets.items()} == \
        {s: sorted(w) for s, w in ravi_classes().items()}
    assert_disjoint(sets)
    assert data.image_shape == (3, 84, 84) and len(data.images) == 200  # grey JPEGs -> RGB


def test_mini_imagenet_missing_image_and_missing_class(tmp_path, capsys):
    src = mini_imagenet_tree(tmp_path / "src")
    gone = src / "images" / f"{ravi_classes()['val'][3]}00000001.jpg"
    gone.unlink()
    assert_fails(capsys, tmp_path / "out", "mini-imagenet", "--src", src,
                 message="image listed in the split CSV not found", names=str(gone))
    src = mini_imagenet_tree(tmp_path / "src2", drop="n03544143")
    assert_fails(capsys, tmp_path / "out", "mini-imagenet", "--src", src,
                 message="has no images in", names="class 'n03544143'")
    assert_fails(capsys, tmp_path / "out", "mini-imagenet", "--src", tmp_path / "src3",
                 message="folder not found", names=str(tmp_path / "src3"))


def mini_imagenet_pickles(root: Path, per_class: int = 2) -> Path:
    root.mkdir(parents=True)
    for split, wnids in ravi_classes().items():
        images = RNG.integers(0, 256, (len(wnids) * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class))
                      for i, w in enumerate(wnids)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return root


def test_pickles_are_refused_without_allow_pickle(tmp_path, capsys, monkeypatch):
    src = mini_imagenet_pickles(tmp_path / "src")

    class Unpickled(BaseException):  # not an Exception: nothing on the way may swallow it
        pass

    def never(*args, **kwargs):
        raise Unpickled("pickle.load was called")

    monkeypatch.setattr(pickle, "load", never)
    assert_fails(capsys, tmp_path / "out", "mini-imagenet", "--src", src,
                 message="--allow-pickle", names="mini-imagenet-cache-train.pkl")
    monkeypatch.undo()
    assert prepare("mini-imagenet", "--src", src, "--out", tmp_path / "s", "--allow-pickle",
                   "--image-size", "42") == 0
    data = open_store(tmp_path / "s")
    assert {s: len(c) for s, c in data.splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert data.image_shape == (3, 42, 42) and len(data.images) == 200


# --- CUB --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cub_src(tmp_path_factory) -> Path:
    return cub_tree(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


def test_cub_chen_split_and_bbox_crop(cub_src, tmp_path):
    assert prepare("cub", "--src", cub_src.parent, "--out", tmp_path / "s",
                   "--image-size", "16") == 0  # SRC may be the parent of CUB_200_2011
    data = open_store(tmp_path / "s")
    sets = class_sets(data)
    assert {s: len(c) for s, c in sets.items()} == {"train": 100, "val": 50, "test": 50}
    assert_disjoint(sets)
    assert "001.Black_footed_Albatross" in sets["train"]
    assert "002.Laysan_Albatross" in sets["val"] and "004.Groove_billed_Ani" in sets["test"]
    assert 100 < data.images.mean() < 155  # half black, half white
    assert prepare("cub", "--src", cub_src, "--out", tmp_path / "crop", "--bbox-crop",
                   "--image-size", "16") == 0
    assert open_store(tmp_path / "crop").images.mean() > 245  # only the white box is left


def test_cub_errors(tmp_path, capsys):
    src = cub_tree(tmp_path / "dropped", per_class=1, drop="150.Sage_Thrasher")
    assert_fails(capsys, tmp_path / "out", "cub", "--src", src,
                 message="of the split list amfs_dist/data/splits/cub.txt has no images",
                 names="class '150.Sage_Thrasher'")
    src = cub_tree(tmp_path / "damaged", per_class=1)
    (src / "bounding_boxes.txt").unlink()
    assert_fails(capsys, tmp_path / "out", "cub", "--src", src, "--bbox-crop",
                 message="file not found", names=str(src / "bounding_boxes.txt"))
    broken = sorted((src / "images").rglob("*.jpg"))[5]
    broken.write_bytes(broken.read_bytes()[:100])
    assert_fails(capsys, tmp_path / "out", "cub", "--src", src,
                 message="cannot decode image", names=str(broken))
    broken.unlink()
    assert_fails(capsys, tmp_path / "out", "cub", "--src", src,
                 message="image listed in images.txt not found", names=str(broken))
    (tmp_path / "empty").mkdir()
    assert_fails(capsys, tmp_path / "out", "cub", "--src", tmp_path / "empty",
                 message="folder not found", names=str(tmp_path / "empty" / "images"))


# --- CIFAR-100: FC100 and CIFAR-FS --------------------------------------------------------

def cifar_names() -> tuple[list[str], list[str], dict[str, str]]:
    superclass = {c: s for _, s, c in split_list("cifar_fs")}
    return sorted(superclass), sorted(set(superclass.values())), superclass


def cifar_records(per_class: int, drop: str | None = None, offset: int = 0):
    """(coarse, fine, pixels) with R = fine index, G = image number within the class."""
    fine_names, coarse_names, superclass = cifar_names()
    coarse, fine, pixels = [], [], []
    for f, name in enumerate(fine_names):
        if name == drop:
            continue
        for k in range(per_class):
            image = np.zeros((3, 32, 32), np.uint8)
            image[0], image[1] = f, offset + k
            coarse.append(coarse_names.index(superclass[name]))
            fine.append(f)
            pixels.append(image)
    return np.array(coarse, np.uint8), np.array(fine, np.uint8), np.stack(pixels)


def cifar_binary_tree(root: Path, drop: str | None = None) -> Path:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    for name, per_class, offset in (("train.bin", 3, 0), ("test.bin", 2, 100)):
        coarse, fine, pixels = cifar_records(per_class, drop, offset)
        records = np.concatenate([coarse[:, None], fine[:, None], pixels.reshape(len(fine), -1)],
                                 axis=1)
        (folder / name).write_bytes(records.astype(np.uint8).tobytes())
    fine_names, coarse_names, _ = cifar_names()
    (folder / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
    return root


def cifar_python_tree(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names, coarse_names, _ = cifar_names()
    for name, per_class, offset in (("train", 3, 0), ("test", 2, 100)):
        coarse, fine, pixels = cifar_records(per_class, None, offset)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels.reshape(len(fine), -1), "fine_labels": fine.tolist(),
                         "coarse_labels": coarse.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)
    return root


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory) -> Path:
    return cifar_binary_tree(tmp_path_factory.mktemp("cifar"))


def test_fc100_superclass_split(cifar_src, tmp_path):
    assert prepare("fc100", "--src", cifar_src, "--out", tmp_path / "s") == 0
    data = open_store(tmp_path / "s")
    sets = class_sets(data)
    assert {s: len(c) for s, c in sets.items()} == {"train": 60, "val": 20, "test": 20}
    assert_disjoint(sets)
    groups = {s: {data.groups[c] for c in cls} for s, cls in data.splits.items()}
    assert {s: len(g) for s, g in groups.items()} == {"train": 12, "val": 4, "test": 4}
    assert_disjoint(groups)  # FC100 splits whole superclasses
    assert groups["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert len(data.images) == 100 * 5 and data.image_shape == (3, 32, 32)


def test_cifar_fs_split_pools_train_and_test_images(cifar_src, tmp_path):
    assert prepare("cifar-fs", "--src", cifar_src, "--out", tmp_path / "s") == 0
    data = open_store(tmp_path / "s")
    sets = class_sets(data)
    assert {s: len(c) for s, c in sets.items()} == {"train": 64, "val": 16, "test": 20}
    assert_disjoint(sets)
    fine_names = cifar_names()[0]
    whale = data.class_names.index("whale")
    assert whale in data.splits["test"] and data.groups[whale] == "aquatic_mammals"
    images = data.images[data.labels == whale]
    assert (images[:, 0] == fine_names.index("whale")).all()  # R plane: the fine label
    assert sorted(images[:, 1, 0, 0].tolist()) == [0, 1, 2, 100, 101]  # 3 train + 2 test
    assert (images[:, 2] == 0).all()


def test_cifar_python_version_needs_allow_pickle_and_matches_binary(cifar_src, tmp_path, capsys):
    src = cifar_python_tree(tmp_path / "py")
    assert_fails(capsys, tmp_path / "out", "cifar-fs", "--src", src, message="--allow-pickle",
                 names=str(src / "cifar-100-python" / "meta"))
    assert prepare("cifar-fs", "--src", src, "--out", tmp_path / "p", "--allow-pickle") == 0
    assert prepare("cifar-fs", "--src", cifar_src, "--out", tmp_path / "b") == 0
    assert read_manifest(tmp_path / "p")["content_sha256"] == \
        read_manifest(tmp_path / "b")["content_sha256"]


def test_cifar_errors(cifar_src, tmp_path, capsys):
    src = cifar_binary_tree(tmp_path / "truncated")
    train = src / "cifar-100-binary" / "train.bin"
    train.write_bytes(train.read_bytes()[:-10])
    assert_fails(capsys, tmp_path / "out", "fc100", "--src", src, message="truncated",
                 names=str(train))
    src = cifar_binary_tree(tmp_path / "nowhale", drop="whale")
    assert_fails(capsys, tmp_path / "out", "cifar-fs", "--src", src,
                 message="has no images", names="class 'whale'")
    assert_fails(capsys, tmp_path / "out", "fc100", "--src", tmp_path / "nowhale" / "x",
                 message="folder not found", names="x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_fails(capsys, tmp_path / "out", "fc100", "--src", empty, message="file not found",
                 names=str(empty / "cifar-100-binary" / "train.bin"))


# --- the shipped split lists and the command line ------------------------------------------

def test_shipped_split_lists():
    counts = lambda rows, col=0: {s: sum(r[col] == s for r in rows) for s in ("train", "val",
                                                                             "test")}
    cub = split_list("cub")
    assert counts(cub) == {"train": 100, "val": 50, "test": 50}
    for i, (split, name) in enumerate(sorted(cub, key=lambda r: r[1])):  # Chen et al. rule
        assert split == ("train" if i % 2 == 0 else "val" if i % 4 == 1 else "test"), name
    assert counts(split_list("mini_imagenet")) == {"train": 64, "val": 16, "test": 20}
    assert counts(split_list("fc100")) == {"train": 12, "val": 4, "test": 4}
    cifar_fs = split_list("cifar_fs")
    assert counts(cifar_fs) == {"train": 64, "val": 16, "test": 20}
    assert len({c for _, _, c in cifar_fs}) == 100
    assert {s for _, s in split_list("fc100")} == {s for _, s, _ in cifar_fs}
    omniglot = {s: 0 for s in ("train", "val", "test")}
    for split, _, span in split_list("omniglot_vinyals"):
        first, last = map(int, span.split("-"))
        omniglot[split] += last - first + 1
    assert omniglot == {"train": 1028, "val": 172, "test": 423}


def test_register_functions_on_a_plain_parser():
    from amfs_dist.benchmarks import data as bench_data
    from amfs_dist.data import cli as data_cli
    from amfs_dist.data.prepare import DATASETS

    assert data_cli.DATASETS == DATASETS
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    data_cli.register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="benchmark")
    bench_data.register(bench)
    args = parser.parse_args(["data", "prepare", "omniglot", "--src", "a", "--out", "b",
                              "--split", "lake", "--rotations", "--image-size", "32"])
    assert args.func is data_cli.run_prepare and args.image_size == 32 and args.rotations
    assert parser.parse_args(["data", "info", "s"]).func is data_cli.run_info
    assert parser.parse_args(["bench", "data", "--scale", "0.1"]).func is bench_data.run


def test_bench_data_prints_json_lines(capsys):
    import json
    assert amfs(["bench", "data", "--scale", "0.03", "--batches", "1", "--tasks", "4",
                 "--trainer-steps", "0"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["store"] for r in records] == ["omniglot-sized", "mini-imagenet-sized"]
    assert records[0]["classes"] == 1623 and records[0]["image_shape"] == [1, 28, 28]
    assert records[1]["images"] == 100 * 18 and records[1]["image_shape"] == [3, 84, 84]
    assert all(r["sampler_episodes_per_s"] > 0 for r in records)
    assert all(r["trainer_tasks_per_s"] is None and "skipped" in r["trainer_note"]
               for r in records)


def test_bench_data_reports_the_trainer_rate(tmp_path, monkeypatch):
    answer = {"tasks_per_s": 12.5, "step_s": 2.56}
    import sys
    import types

    from amfs_dist.benchmarks import data as bench_data

    seen = {}

    def tasks_per_second(cfg, steps):
        seen.update(source=cfg["data.source"], batch=cfg["train.meta_batch"], steps=steps)
        return answer

    monkeypatch.setitem(sys.modules, "amfs_dist.benchmarks.train",
                        types.SimpleNamespace(tasks_per_second=tasks_per_second))
    assert bench_data.trainer_rate(tmp_path / "store", 32, 2) == (12.5, None)
    assert seen == {"source": str(tmp_path / "store"), "batch": 32, "steps": 2}


# --- the store's folder: killed prepares, permissions, class order ----------------------

KILLED_WHILE_WRITING = """
import os, signal, sys
import pyarrow.ipc
real_new_file = pyarrow.ipc.new_file
def new_file_then_die(*args, **kwargs):
    real_new_file(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9` mid-write would
pyarrow.ipc.new_file = new_file_then_die
from amfs_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_folders_of_a_killed_prepare_are_removed_by_the_next_one(tmp_path):
    src = lake_tree(tmp_path / "src")
    out = tmp_path / "stores" / "omni"
    args = ["data", "prepare", "omniglot", "--src", str(src), "--out", str(out), "--split",
            "lake"]
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, *args])
    assert killed.wait(timeout=300) == -signal.SIGKILL
    stale = sorted(p.name for p in out.parent.iterdir())  # and the lock it held (locks.py)
    assert len(stale) == 2 and stale[0] == ".omni.lock" and stale[1].startswith(".omni.tmp-")
    assert not out.exists()
    assert amfs(args) == 0
    assert [p.name for p in out.parent.iterdir()] == ["omni"]

    from amfs_dist.data.store import _host
    kept = [f".omni.tmp-{_host()}-{os.getpid()}-running1",  # a prepare still at work
            f".omni.tmp-elsewhere-{killed.pid}-otherhost",  # another machine's: can't tell
            f".omni.tmp-{_host()}-{killed.pid}-usersfile",  # holds a file that is not ours
            ".omni.tmp-notes"]  # not a name of ours
    for name in kept:
        (out.parent / name).mkdir()
    (out.parent / kept[2] / "thesis.txt").write_text("mine")
    gone = out.parent / f".omni.tmp-{_host()}-{killed.pid}-deadone1"
    gone.mkdir()
    (gone / "data.arrow").write_bytes(b"half a store")
    assert amfs(args + ["--force"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(kept + ["omni"])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=lambda u: f"umask-{u:03o}")
def test_a_store_gets_the_modes_of_the_umask(tmp_path, umask):
    src = lake_tree(tmp_path / "src")
    previous = os.umask(umask)
    try:
        assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake") == 0
        assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake",
                       "--force") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o777 & ~umask
    for file in (tmp_path / "s").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_class_order_is_the_documented_one(tmp_path):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "datasets.md").read_text()
    assert "run split by split" not in doc  # it never did (lake, cub, --rotations)
    assert "not* split by split" in doc and "then all of them at 90, 180 and 270" in doc
    src = lake_tree(tmp_path / "src")
    assert prepare("omniglot", "--src", src, "--out", tmp_path / "s", "--split", "lake",
                   "--rotations") == 0
    data = open_store(tmp_path / "s")
    characters = [f"{a}/character{c:02d}" for a in ("Alpha", "Beta", "Gamma", "Delta")
                  for c in (1, 2)]  # background alphabets by name, then evaluation
    assert data.class_names == [f"{name}/rot{k:03d}" for k in (0, 90, 180, 270)
                                for name in characters]
    split_of = {c: s for s, classes in data.splits.items() for c in classes.tolist()}
    assert [split_of[c] for c in range(8)] == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    assert [split_of[c] for c in range(8, 16)] == [split_of[c] for c in range(8)]
