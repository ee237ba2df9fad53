"""Datasets: scanning and checking ImageFolder trees, loading images, label encoding, synthetic data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from covid_tune.data.dataset import DatasetError, check_implies, encode_targets, load_image, scan_dataset
from covid_tune.data.synthetic import make_synthetic

SPLITS = ("train", "validation", "test")


def dataset_error(root: Path, *needles, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        scan_dataset(root, **kwargs)
    msg = str(info.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in DatasetError message:\n{msg}"
    return info.value


# --- scan_dataset: good trees --------------------------------------------------------------------

def test_scan_classes_and_counts(image_folder) -> None:
    root = image_folder(n=3)
    index = scan_dataset(root)
    assert index.classes == ["covid", "normal", "pneumonia"]
    assert index.original_classes == ["covid", "normal", "pneumonia"]
    assert index.counts() == {s: {"covid": 3, "normal": 3, "pneumonia": 3} for s in SPLITS}
    assert index.skipped == []
    for split in SPLITS:
        paths, labels = index.paths(split), index.labels(split)
        assert len(paths) == 9 and labels.dtype == np.int64
        for p, y in zip(paths, labels):
            assert Path(p).is_file()
            assert Path(p).parent.name == index.classes[y]
            assert Path(p).parent.parent.name == split


def test_scan_unequal_counts(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=4)
    (root / "train" / "b" / "b_0.png").unlink()
    (root / "test" / "a" / "a_3.png").unlink()
    counts = scan_dataset(root).counts()
    assert counts == {"train": {"a": 4, "b": 3}, "validation": {"a": 4, "b": 4}, "test": {"a": 3, "b": 4}}


def test_class_map_merges_classes(image_folder) -> None:
    root = image_folder(n=2)
    index = scan_dataset(root, class_map={"covid": "infected", "pneumonia": "infected"})
    assert index.classes == ["infected", "normal"]
    assert index.original_classes == ["covid", "normal", "pneumonia"]
    assert index.counts() == {s: {"infected": 4, "normal": 2} for s in SPLITS}
    for p, y in index.splits["train"]:
        folder = Path(p).parent.name
        assert index.classes[y] == ("normal" if folder == "normal" else "infected")


def test_split_folder_names_are_case_insensitive(tmp_path: Path) -> None:
    root = tmp_path / "cased"
    for split in ("Train", "Validation", "TEST"):
        for cls in ("normal", "infected"):
            write_image(root / split / cls / "x.png")
    index = scan_dataset(root)
    assert set(index.splits) == set(SPLITS)
    assert index.counts() == {s: {"infected": 1, "normal": 1} for s in SPLITS}
    assert index.paths("test")[0].startswith(str(root / "TEST"))


def test_val_is_an_alias_of_validation(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=1)
    (root / "validation").rename(root / "val")
    assert scan_dataset(root).counts()["validation"] == {"a": 1, "b": 1}


def test_hidden_files_and_folders_are_ignored(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=2)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    index = scan_dataset(root)
    assert index.classes == ["a", "b"] and index.counts()["train"] == {"a": 2, "b": 2}


def test_rgb_and_rgba_images_scan(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=1, mode="RGBA")
    assert scan_dataset(root).counts()["train"] == {"a": 1, "b": 1}


# --- scan_dataset: errors list the offending path ----------------------------------------------------

def test_corrupt_png_is_an_error(image_folder) -> None:
    root = image_folder(n=2)
    bad = root / "train" / "covid" / "broken.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    err = dataset_error(root, bad, "unreadable image", "on_bad_file")
    assert any(str(bad) in p for p in err.problems)


def test_stray_text_file_is_an_error(image_folder) -> None:
    root = image_folder(n=2)
    notes = root / "validation" / "normal" / "notes.txt"
    notes.write_text("not an image")
    dataset_error(root, notes, "not an image file", ".txt")


def test_every_bad_file_is_listed(image_folder) -> None:
    root = image_folder(n=2)
    notes = root / "validation" / "normal" / "notes.txt"
    notes.write_text("not an image")
    bad = root / "test" / "pneumonia" / "zeros.png"
    bad.write_bytes(b"\x00" * 64)
    err = dataset_error(root, notes, bad)
    assert len([p for p in err.problems if str(notes) in p or str(bad) in p]) == 2


@pytest.mark.parametrize("split", SPLITS)
def test_missing_split(image_folder, split: str) -> None:
    root = image_folder(n=1)
    shutil.rmtree(root / split)
    dataset_error(root, root, "missing split", repr(split))


def test_missing_data_folder(tmp_path: Path) -> None:
    dataset_error(tmp_path / "nothing", tmp_path / "nothing", "does not exist")


def test_split_given_twice(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=1)
    shutil.copytree(root / "validation", root / "val")
    dataset_error(root, root / "val", "given twice")


def test_class_folders_differ_between_splits(image_folder) -> None:
    root = image_folder(n=1)
    shutil.rmtree(root / "test" / "pneumonia")
    dataset_error(root, root / "test", "missing class folder", "pneumonia")


def test_extra_class_in_one_split(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=1)
    write_image(root / "train" / "c" / "c.png")
    err = dataset_error(root, root / "validation", root / "test", "'c'")
    assert len(err.problems) == 2


def test_empty_class_folder(image_folder) -> None:
    root = image_folder(n=2)
    folder = root / "validation" / "normal"
    for f in folder.iterdir():
        f.unlink()
    dataset_error(root, folder, "no usable images", "normal", "validation")


def test_class_map_key_naming_no_class(image_folder) -> None:
    root = image_folder(n=1)
    dataset_error(root, "class_map", "covid19", "normal", class_map={"covid19": "infected"})


def test_skip_bad_files_with_a_warning(image_folder) -> None:
    root = image_folder(n=3)
    bad = root / "train" / "covid" / "broken.png"
    bad.write_bytes(np.random.default_rng(1).bytes(200))
    notes = root / "test" / "normal" / "notes.txt"
    notes.write_text("hello")
    with pytest.warns(UserWarning, match="skipping 2 bad file") as record:
        index = scan_dataset(root, on_bad_file="skip")
    text = "\n".join(str(w.message) for w in record)
    assert str(bad) in text and str(notes) in text
    assert sorted(index.skipped) == sorted([str(bad), str(notes)])
    assert index.counts() == {s: {"covid": 3, "normal": 3, "pneumonia": 3} for s in SPLITS}
    assert str(bad) not in index.paths("train") and str(notes) not in index.paths("test")


def test_skip_still_fails_when_a_class_is_left_empty(image_folder) -> None:
    root = image_folder(classes=("a", "b"), n=1)
    for f in (root / "train" / "a").iterdir():
        f.unlink()
    (root / "train" / "a" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning):
        dataset_error(root, root / "train" / "a", "no usable images", on_bad_file="skip")


def test_truncated_jpeg_is_an_error(image_folder, tmp_path: Path) -> None:
    root = image_folder(classes=("a", "b"), n=1)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    bad = root / "train" / "a" / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):  # what training would hit later
        load_image(str(bad))
    dataset_error(root, bad)


# --- load_image ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("grayscale", [True, False])
def test_load_image_gives_three_channel_rgb(tmp_path: Path, mode: str, grayscale: bool) -> None:
    path = write_image(tmp_path / f"x_{mode}.png", mode, size=20, seed=3)
    im = load_image(str(path), grayscale=grayscale)
    assert im.mode == "RGB" and im.size == (20, 20)
    arr = np.asarray(im)
    assert arr.shape == (20, 20, 3)
    if grayscale or mode == "L":
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    else:
        assert not np.array_equal(arr[..., 0], arr[..., 1])


def test_load_image_grayscale_keeps_pixel_values(tmp_path: Path) -> None:
    path = write_image(tmp_path / "g.png", "L", size=16, seed=5)
    original = np.asarray(Image.open(path))
    arr = np.asarray(load_image(str(path)))
    for c in range(3):
        assert np.array_equal(arr[..., c], original)


def test_load_image_rgb_in_color(tmp_path: Path) -> None:
    path = write_image(tmp_path / "c.png", "RGB", size=16, seed=6)
    assert np.array_equal(np.asarray(load_image(str(path), grayscale=False)), np.asarray(Image.open(path)))


def test_load_image_rgb_to_gray_uses_luminance(tmp_path: Path) -> None:
    path = write_image(tmp_path / "c.png", "RGB", size=16, seed=7)
    rgb = np.asarray(Image.open(path)).astype(float)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    arr = np.asarray(load_image(str(path))).astype(float)
    assert np.abs(arr[..., 0] - lum).max() <= 1.0


def test_load_image_rgba_is_composited_on_black(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", "RGBA", size=16, seed=8)
    rgba = np.asarray(Image.open(path)).astype(float)
    expected = rgba[..., :3] * rgba[..., 3:] / 255.0
    arr = np.asarray(load_image(str(path), grayscale=False)).astype(float)
    assert np.abs(arr - expected).max() <= 1.0


def test_load_image_16_bit_grayscale_is_rescaled(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(load_image(str(path)))[..., 0].astype(float)
    expected = values / 65535 * 255
    assert np.abs(arr - expected).max() <= 1.5


# --- labels ----------------------------------------------------------------------------------------

CLASSES = ["covid", "normal", "pneumonia"]


def test_encode_targets_single_is_class_indices() -> None:
    labels = np.array([2, 0, 1, 1])
    out = encode_targets(labels, CLASSES, "single", {"covid": ["pneumonia"]})
    assert out.dtype == np.int64 and out.tolist() == [2, 0, 1, 1]


def test_encode_targets_multi_applies_implies() -> None:
    out = encode_targets(np.array([0, 1, 2, 0]), CLASSES, "multi", implies={"covid": ["pneumonia"]})
    assert out.dtype == np.float32 and out.shape == (4, 3)
    assert out.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 1]]


def test_encode_targets_multi_without_implies_is_one_hot() -> None:
    out = encode_targets(np.array([0, 1, 2]), CLASSES, "multi")
    assert out.tolist() == np.eye(3).tolist()


def test_encode_targets_multi_several_implied() -> None:
    out = encode_targets(np.array([1, 0]), ["a", "b", "c", "d"], "multi", implies={"b": ["a", "d"], "c": ["d"]})
    assert out.tolist() == [[1, 1, 0, 1], [1, 0, 0, 0]]


def test_check_implies_accepts_known_classes() -> None:
    assert check_implies(CLASSES, {"covid": ["pneumonia"]}) is None
    assert check_implies(CLASSES, {}) is None


@pytest.mark.parametrize("implies, unknown", [({"covid19": ["pneumonia"]}, "covid19"),
                                              ({"covid": ["viral"]}, "viral")])
def test_check_implies_rejects_unknown_classes(implies: dict, unknown: str) -> None:
    with pytest.raises(ValueError) as info:
        check_implies(CLASSES, implies)
    msg = str(info.value)
    assert unknown in msg and all(c in msg for c in CLASSES)


# --- make_synthetic --------------------------------------------------------------------------------

SYN_COUNTS = {"train": 3, "validation": 2, "test": 2}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_make_synthetic_writes_imagefolder_layout(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "syn", classes=("covid", "normal", "pneumonia"), counts=SYN_COUNTS,
                          image_size=24)
    assert root == tmp_path / "syn"
    for split, n in SYN_COUNTS.items():
        for cls in ("covid", "normal", "pneumonia"):
            files = sorted((root / split / cls).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.mode == "L" and im.size == (24, 24)
    index = scan_dataset(root)
    assert index.classes == ["covid", "normal", "pneumonia"]
    assert index.counts() == {s: {c: SYN_COUNTS[s] for c in index.classes} for s in SPLITS}
    assert not list(tmp_path.glob("syn.tmp*"))  # no temporary folder left behind


def test_make_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = tree(make_synthetic(tmp_path / "a", counts=SYN_COUNTS, image_size=20, seed=4))
    b = tree(make_synthetic(tmp_path / "b", counts=SYN_COUNTS, image_size=20, seed=4))
    assert len(a) == 2 * sum(SYN_COUNTS.values())
    assert a == b
    c = tree(make_synthetic(tmp_path / "c", counts=SYN_COUNTS, image_size=20, seed=5))
    assert set(c) == set(a) and c != a  # another seed, other pixels


def test_make_synthetic_classes_look_different(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", counts={"train": 8, "validation": 1, "test": 1}, image_size=32)
    mean = {c: np.mean([np.asarray(Image.open(f), dtype=float).mean() for f in (root / "train" / c).glob("*.png")])
            for c in ("infected", "normal")}
    assert mean["infected"] > mean["normal"]  # opacities brighten the lungs


def test_make_synthetic_second_call_is_a_no_op(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", counts=SYN_COUNTS, image_size=20)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    inodes = {p: p.stat().st_ino for p in root.rglob("*")}
    again = make_synthetic(tmp_path / "s", counts=SYN_COUNTS, image_size=20)
    assert again == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert {p: p.stat().st_ino for p in root.rglob("*")} == inodes


def test_make_synthetic_with_other_arguments_rewrites(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", counts=SYN_COUNTS, image_size=20)
    make_synthetic(tmp_path / "s", counts=SYN_COUNTS, image_size=28)
    with Image.open(next(root.rglob("*.png"))) as im:
        assert im.size == (28, 28)
    assert tree(root) == tree(make_synthetic(tmp_path / "fresh", counts=SYN_COUNTS, image_size=28))
    assert os.path.isfile(root / ".synthetic.json")
