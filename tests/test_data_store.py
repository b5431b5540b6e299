"""The Arrow store: round trip, memory mapping, validation, atomic writes, episodes, conversion."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amfs_dist.cli import main as amfs
from amfs_dist.data.convert import image_converter
from amfs_dist.data.episodes import ImageEpisodeSampler
from amfs_dist.data.store import StoreError, content_hash, open_store, read_manifest, write_store
from helpers import class_marked_set


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"
    write_store(path, class_marked_set(), source="unit", split_name="fixed")
    return path


def test_round_trip_keeps_images_labels_classes_and_splits(store):
    original, data = class_marked_set(), open_store(store)
    assert np.array_equal(data.images, original.images)
    assert np.array_equal(data.labels, original.labels)
    assert data.class_names == original.class_names and data.groups == original.groups
    assert {s: c.tolist() for s, c in data.splits.items()} == \
        {s: c.tolist() for s, c in original.splits.items()}
    manifest = read_manifest(store)
    assert manifest["source"] == "unit" and manifest["split"] == "fixed"
    assert manifest["image_shape"] == [1, 6, 6] and manifest["num_images"] == 240
    assert {s: (v["classes"], v["images"]) for s, v in manifest["splits"].items()} == \
        {"train": (6, 120), "val": (3, 60), "test": (3, 60)}
    assert manifest["content_sha256"] == content_hash(data)
    assert sorted(os.listdir(store)) == ["data.arrow", "manifest.json"]


def test_splits_are_class_disjoint_and_cover_every_class(store):
    data = open_store(store)
    members = [set(c.tolist()) for c in data.splits.values()]
    assert all(not (a & b) for i, a in enumerate(members) for b in members[i + 1:])
    assert set().union(*members) == set(range(len(data.class_names)))


def _mapped_files(address: int) -> set[str]:
    """Files whose memory mapping in this process contains `address` (Linux /proc)."""
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi and len(fields) == 6:
            files.add(fields[5].strip())
    return files


def test_images_are_a_read_only_view_of_the_memory_mapped_file(store):
    before = pa.total_allocated_bytes()
    data = open_store(store)
    assert pa.total_allocated_bytes() - before < 4096  # no copy of the 8.6 kB of pixels
    assert not data.images.flags.owndata and not data.images.flags.writeable
    base = data.images
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, pa.Buffer)  # numpy view -> Arrow buffer, no copy on the way
    if Path("/proc/self/maps").exists():
        assert str((store / "data.arrow").resolve()) in _mapped_files(data.images.ctypes.data)
        assert str((store / "data.arrow").resolve()) in _mapped_files(data.labels.ctypes.data)


def test_episodes_from_a_store_are_deterministic_and_class_consistent(store):
    first = ImageEpisodeSampler(open_store(store), ways=3, shots=2, queries=4, seed=7)
    again = ImageEpisodeSampler(open_store(store), ways=3, shots=2, queries=4, seed=7)
    other = ImageEpisodeSampler(open_store(store), ways=3, shots=2, queries=4, seed=8)
    a, b = first.sample("train", 5, [0, 1, 2]), again.sample("train", 5, [0, 1, 2])
    for x, y in zip((a.xs, a.ys, a.xq, a.yq), (b.xs, b.ys, b.xq, b.yq)):
        assert torch.equal(x, y)
    assert not torch.equal(a.xs, other.sample("train", 5, [0, 1, 2]).xs)
    # a task's episode depends on (seed, split, step, task id) only, not on its batch
    assert torch.equal(first.sample("train", 5, [2]).xs[0], a.xs[2])
    data = open_store(store)
    for split in ("train", "val", "test"):
        ep = first.sample(split, 1, list(range(4)))
        assert ep.xs.dtype == torch.uint8  # images reach the device as bytes
        cls_s = ep.xs[..., 0, 0, 0].long()  # the class mark of each image
        cls_q = ep.xq[..., 0, 0, 0].long()
        for t in range(4):
            for way in range(3):
                classes = set(cls_s[t][ep.ys[t] == way].tolist()) | \
                    set(cls_q[t][ep.yq[t] == way].tolist())
                assert len(classes) == 1  # one class per way, support and query alike
                assert classes <= set(data.splits[split].tolist())


def test_sampler_refuses_too_few_classes_or_images(tmp_path):
    path = tmp_path / "few"
    write_store(path, class_marked_set(classes=8, per_class=5, splits=(4, 2, 2)),
                source="unit", split_name="fixed")
    with pytest.raises(ValueError, match=r"split 'val' has 2 classes, fewer than data.ways=3"):
        ImageEpisodeSampler(open_store(path), ways=3, shots=1, queries=1, seed=0)
    sampler = ImageEpisodeSampler(open_store(path), ways=2, shots=2, queries=4, seed=0)
    with pytest.raises(ValueError, match=r"class 'c0\d' has 5 images, fewer than shots \+ "
                                         r"queries = 6"):
        sampler.sample("train", 0, [0])


def test_existing_out_is_refused_unless_forced(store):
    with pytest.raises(StoreError, match="already exists; pass --force"):
        write_store(store, class_marked_set(classes=6, splits=(2, 2, 2)), source="unit",
                    split_name="fixed")
    assert read_manifest(store)["num_classes"] == 12  # untouched
    write_store(store, class_marked_set(classes=6, splits=(2, 2, 2)), source="unit",
                split_name="fixed", force=True)
    assert read_manifest(store)["num_classes"] == 6
    assert sorted(os.listdir(store.parent)) == ["store"]  # no temporary folders left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import amfs_dist.data.store as store_module

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.pa.ipc, "new_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        write_store(tmp_path / "out", class_marked_set(), source="unit", split_name="fixed")
    assert os.listdir(tmp_path) == []


def test_write_refuses_a_class_without_images(tmp_path):
    data = class_marked_set()
    data.labels[data.labels == 3] = 2
    with pytest.raises(StoreError, match="class 'c03' has no images"):
        write_store(tmp_path / "out", data, source="unit", split_name="fixed")
    assert os.listdir(tmp_path) == []


def _edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda s: (s / "manifest.json").unlink(),
                 "is not an amfs data store: manifest.json is missing", id="manifest-missing"),
    pytest.param(lambda s: (s / "manifest.json").write_text("{"),
                 "manifest.json: not valid JSON", id="manifest-not-json"),
    pytest.param(lambda s: _edit_manifest(s, lambda m: m.update(format="other")),
                 "not an amfs data store", id="manifest-of-another-format"),
    pytest.param(lambda s: (s / "data.arrow").unlink(), "data.arrow is missing",
                 id="table-missing"),
    pytest.param(lambda s: (s / "data.arrow").write_bytes(b"not arrow at all"),
                 "not a readable Arrow file", id="table-not-arrow"),
    pytest.param(lambda s: _edit_manifest(s, lambda m: m["splits"]["train"].update(images=7)),
                 "manifest mismatch: the number of images in split 'train' is 7",
                 id="manifest-split-size-unlike-the-table"),
    pytest.param(lambda s: _edit_manifest(s, lambda m: m.update(image_shape=[3, 6, 6])),
                 "manifest mismatch: the image size is", id="manifest-image-shape-unlike-the-table"),
    pytest.param(lambda s: _edit_manifest(s, lambda m: m.update(num_classes=13)),
                 "manifest mismatch", id="manifest-class-count-unlike-the-table"),
])
def test_open_store_names_the_path_of_a_broken_store(store, damage, message):
    damage(store)
    with pytest.raises(StoreError, match=message) as error:
        open_store(store)
    assert str(store) in str(error.value)


def test_open_store_of_a_missing_or_plain_folder(tmp_path):
    with pytest.raises(StoreError, match="no such store folder"):
        open_store(tmp_path / "nope")
    with pytest.raises(StoreError, match="is not an amfs data store"):
        open_store(tmp_path)


def test_verify_detects_changed_pixels(tmp_path):
    data = class_marked_set(shape=(1, 16, 16))
    path = tmp_path / "store"
    write_store(path, data, source="unit", split_name="fixed")
    raw = bytearray((path / "data.arrow").read_bytes())
    at = raw.find(data.images[37].tobytes())
    assert at > 0
    raw[at + 100] ^= 0xFF
    (path / "data.arrow").write_bytes(bytes(raw))
    open_store(path)  # structure still fine
    with pytest.raises(StoreError, match="content hash differs"):
        open_store(path, verify=True)


def test_info_command_prints_a_table_and_json(store, capsys):
    assert amfs(["data", "info", str(store), "--verify"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "unit, split fixed, images 1x6x6" in lines[0]
    assert lines[2].split() == ["train", "6", "120", "2", "20-20"]
    assert lines[4].split() == ["test", "3", "60", "1", "20-20"]
    assert lines[5].split() == ["total", "12", "240"] and "content hash verified" in out
    assert amfs(["data", "info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(r["split"], r["classes"], r["images"]) for r in info["splits"]] == \
        [("train", 6, 120), ("val", 3, 60), ("test", 3, 60)]


def test_info_on_a_non_store_is_one_line_and_exit_2(tmp_path, capsys):
    assert amfs(["data", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "Traceback" not in err


# --- the cross-domain conversion rule ---------------------------------------------------

def test_converter_is_identity_when_shapes_match():
    x = torch.rand(4, 3, 8, 8)
    assert image_converter(3, 8)(x) is x


def test_converter_rgb_to_grey_uses_bt601_luminance():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0], x[1, 1] = 1.0, 0.5  # pure red; half green
    y = image_converter(1, 4)(x)
    assert y.shape == (2, 1, 4, 4)
    assert torch.allclose(y[0], torch.full((1, 4, 4), 0.299))
    assert torch.allclose(y[1], torch.full((1, 4, 4), 0.5 * 0.587))


def test_converter_grey_to_rgb_repeats_and_resizes_with_antialias():
    x = torch.rand(5, 2, 1, 28, 28)  # leading [T, N] dims are kept
    y = image_converter(3, 84)(x)
    assert y.shape == (5, 2, 3, 84, 84)
    assert torch.equal(y[:, :, 0], y[:, :, 1]) and torch.equal(y[:, :, 0], y[:, :, 2])
    ref = torch.nn.functional.interpolate(x.flatten(0, 1), size=(84, 84), mode="bilinear",
                                          antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(y[:, :, :1].flatten(0, 1), ref)
    down = image_converter(1, 7)(torch.ones(1, 1, 28, 28))
    assert down.shape == (1, 1, 7, 7) and torch.allclose(down, torch.ones_like(down))


def test_converter_order_does_not_matter():
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    y = image_converter(1, 20)(x)
    resize_first = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear",
                                                   antialias=True, align_corners=False)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(y, (resize_first * weights).sum(1, keepdim=True).clamp(0, 1))


def test_converter_rejects_other_channel_counts():
    from amfs_dist.errors import UserError
    with pytest.raises(UserError, match="data.channels must be 1 or 3"):
        image_converter(2, 8)
    with pytest.raises(UserError, match="cannot convert 4-channel images"):
        image_converter(3, 8)(torch.rand(1, 4, 8, 8))


def test_converter_as_the_samplers_transform_for_cross_domain_episodes(store):
    plain = ImageEpisodeSampler(open_store(store), ways=3, shots=1, queries=2, seed=1)
    to_rgb = ImageEpisodeSampler(open_store(store), ways=3, shots=1, queries=2, seed=1,
                                 image_transform=image_converter(3, 12),
                                 input_shape=(3, 12, 12))
    a, b = plain.sample("test", 4, [0, 1]), to_rgb.sample("test", 4, [0, 1])
    assert a.xs.shape == (2, 3, 1, 6, 6) and b.xs.shape == (2, 3, 3, 12, 12)
    assert b.xq.shape == (2, 6, 3, 12, 12) and torch.equal(a.yq, b.yq)
    back = torch.nn.functional.interpolate(a.to("cpu").xq.flatten(0, 1), size=(12, 12), mode="bilinear",
                                           antialias=True, align_corners=False).clamp(0, 1)
    assert torch.allclose(b.xq.flatten(0, 1), back.expand(-1, 3, -1, -1))


# --- any manifest loads or is one UserError line -------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=10)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifests") / "store"
    write_store(path, class_marked_set(), source="unit", split_name="fixed")
    return path


def manifest_texts(valid: dict):
    """Raw bytes, any JSON, and the valid manifest with one field replaced, dropped or nested
    deeper; image shapes with the right byte count in another order."""
    def replaced(kv):
        return {**valid, kv[0]: kv[1]}

    def in_split(t):
        out = json.loads(json.dumps(valid))
        out["splits"].setdefault(t[0], {})[t[1]] = t[2]
        return out

    fields = st.sampled_from(sorted(valid))
    manifests = st.one_of(
        JSON, st.tuples(fields, JSON).map(replaced),
        fields.map(lambda k: {f: v for f, v in valid.items() if f != k}),
        st.tuples(st.sampled_from(["train", "val", "test", "other"]),
                  st.sampled_from(["classes", "images"]), JSON).map(in_split),
        st.permutations([1, 6, 6]).map(lambda s: {**valid, "image_shape": s}))
    return st.binary(max_size=40) | manifests.map(lambda m: json.dumps(m).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_manifest_loads_or_is_one_user_error(pristine, data):
    valid = json.loads((pristine / "manifest.json").read_text())
    store = pristine.parent / "edited"
    if not store.exists():
        store.mkdir()
        os.link(pristine / "data.arrow", store / "data.arrow")
    (store / "manifest.json").write_bytes(data.draw(manifest_texts(valid)))
    try:
        read_manifest(store)
        open_store(store)
    except StoreError as e:  # any other exception fails the test
        assert "\n" not in str(e) and str(store) in str(e)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = amfs(["data", "info", str(store)])
    assert rc in (0, 2)
    assert rc == 0 or (err.getvalue().startswith("amfs: error: ") and
                       err.getvalue().count("\n") == 1 and str(store) in err.getvalue())
