"""Issue 27, inputs: bad model folders and options of predict, data a study cannot use (one class, images
shared across splits), `true` where a number belongs, a weights path that is a folder. Each case: the exit
code, the message, no traceback, and what is (not) on disk afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, write_image
from PIL import Image

from covid_tune.cli import predict as predict_mod
from covid_tune.cli import run as run_mod
from covid_tune.engine.hparams import HParams
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, save_exported

CLASSES = ["infected", "normal"]


def export_untrained(folder: Path) -> Path:
    """An exported model folder as results.export_best writes it, from an untrained tiny_cnn."""
    hp = HParams(backbone="tiny_cnn", freeze="none", loss="ce", head_hidden=8, image_size=32)
    torch.manual_seed(0)
    meta = {**asdict(hp), "config_id": "tiny_cnn-none-ce-s0", "classes": CLASSES, "epoch": 1, "metrics": {},
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    save_exported(create_model("tiny_cnn", 2, head_hidden=8).state_dict(), meta, folder)
    return folder


def predict(capsys, *args) -> tuple[int, str, str]:
    rc = predict_mod.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return export_untrained(tmp_path / "model")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    write_image(tmp_path / "imgs" / "a.png", "L", size=40)
    write_image(tmp_path / "imgs" / "b.png", "RGB", size=40, seed=1)
    return tmp_path / "imgs"


# --- 11. predict -------------------------------------------------------------------------------

def test_predict_truncated_model_pt_is_one_message_and_exit_2_without_traceback(model: Path, images: Path) -> None:
    data = (model / "model.pt").read_bytes()
    (model / "model.pt").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-m", "covid_tune", "predict", str(model), str(images)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("covid_tune: ")
    assert "model.pt: not a readable PyTorch state_dict" in lines[0] and "truncated" in lines[0]


@pytest.mark.parametrize("content,words", [
    ("{not json", "model.json: not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    (None, "unknown backbone 'resnet999'"),
    ("drop", "missing key(s) image_size"),
])
def test_predict_bad_model_json_is_exit_2(model: Path, images: Path, capsys, content, words) -> None:
    meta = json.loads((model / "model.json").read_text())
    if content is None:
        content = json.dumps({**meta, "backbone": "resnet999"})
    elif content == "drop":
        content = json.dumps({k: v for k, v in meta.items() if k != "image_size"})
    (model / "model.json").write_text(content)
    rc, out, err = predict(capsys, model, images, "--csv", model.parent / "p.csv")
    assert rc == 2 and out == "" and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (model.parent / "p.csv").exists()


def test_predict_state_dict_of_another_model_is_exit_2(model: Path, images: Path, capsys) -> None:
    torch.save({"weight": torch.zeros(3)}, model / "model.pt")
    rc, out, err = predict(capsys, model, images)
    assert rc == 2 and out == "" and "model.pt: does not fit model.json (tiny_cnn, 2 classes)" in err


@pytest.mark.parametrize("size", ["0", "-4"])
def test_predict_batch_size_below_one_is_exit_2(model: Path, images: Path, capsys, size: str) -> None:
    rc, out, err = predict(capsys, model, images, "--batch-size", size)
    assert rc == 2 and out == "" and f"--batch-size {size}: must be at least 1" in err


@pytest.mark.parametrize("where,words", [
    ("missing/p.csv", "does not exist"),
    ("a_file/p.csv", "is not a folder"),
    ("a_dir", "is a folder, expected a file name"),
])
def test_predict_unwritable_csv_is_refused_before_any_work(model: Path, images: Path, tmp_path: Path, capsys,
                                                           where: str, words: str) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    csv_path = tmp_path / where
    rc, out, err = predict(capsys, model, images, "--csv", csv_path, "--cam", tmp_path / "cams")
    assert rc == 2 and out == "" and f"--csv {csv_path}: " in err and words in err
    assert "[covid_tune] model" not in err  # refused before the model was loaded or any image read
    assert not (tmp_path / "cams").exists() and not (tmp_path / "missing").exists()


def test_predict_cam_under_a_file_is_exit_2(model: Path, images: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("x")
    rc, out, err = predict(capsys, model, images, "--cam", tmp_path / "a_file" / "cams")
    assert rc == 2 and out == "" and "is not a folder" in err


def test_predict_target_that_is_no_sweep_or_model_is_exit_2(tmp_path: Path, images: Path, capsys) -> None:
    rc, out, err = predict(capsys, tmp_path / "nowhere", images)
    assert rc == 2 and "neither a sweep output folder" in err
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "spec.json").write_text("{broken")
    rc, out, err = predict(capsys, sweep, images)
    assert rc == 2 and out == "" and "spec.json: not valid JSON" in err and "Traceback" not in err


def test_predict_finds_no_images_exit_1_naming_where(model: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = predict(capsys, model, empty, "--csv", tmp_path / "p.csv")
    assert rc == 1 and out == "" and f"no images found in {empty}" in err
    assert not (tmp_path / "p.csv").exists()
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "a.txt").write_text("x")
    (notes / "b.csv").write_text("x")
    rc, out, err = predict(capsys, model, notes)
    assert rc == 1 and out == "" and f"no images found in {notes}" in err and "2 other file(s)" in err


def test_predict_still_classifies_good_images(model: Path, images: Path, tmp_path: Path, capsys) -> None:
    """The checks refuse only what is wrong: a sound model and images still give exit 0 and a CSV."""
    rc, out, err = predict(capsys, model, images, "--csv", tmp_path / "p.csv", "--batch-size", "1")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 2 and len((tmp_path / "p.csv").read_text().splitlines()) == 3
    assert not list(tmp_path.glob(".covid_tune-probe-*"))


# --- 12. data a study cannot use ----------------------------------------------------------------

def make_tree(root: Path, classes=("covid", "normal"), n: int = 4, size: int = 40) -> Path:
    for s_i, split in enumerate(("train", "validation", "test")):
        for c_i, cls in enumerate(classes):
            for i in range(n):
                write_image(root / split / cls / f"{cls}_{i}.png", "L", size=size, seed=100 * s_i + 10 * c_i + i)
    return root


def add_duplicates(root: Path) -> None:
    """One test image byte-identical to a train image; one validation image with a train image's pixels in
    another format (other bytes, same decoded pixels)."""
    shutil.copy(root / "train" / "covid" / "covid_0.png", root / "test" / "covid" / "copy.png")
    Image.open(root / "train" / "normal" / "normal_1.png").save(root / "validation" / "normal" / "copy.bmp")


def write_spec(tmp_path: Path, data: dict, **sections) -> Path:
    raw = {"name": "inputs", "output": str(tmp_path / "out"), "data": {"image_size": 32, "augment": False, **data},
           "grid": {"backbone": ["tiny_cnn"]}, "trainer": {"epochs": 1, "weights": "none", "head_hidden": 8,
                                                           "batch_size": 8},
           "scheduler": {"grace_period": 1}, "resources": {"cpus": 1, "gpu": 0}, **sections}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    rc = run_mod.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("dry", [False, True])
def test_one_class_folder_is_exit_2_naming_split_and_classes(tmp_path: Path, capsys, dry: bool) -> None:
    root = make_tree(tmp_path / "data", classes=("covid",))
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root)}), *(["--dry-run"] if dry else []))
    assert rc == 2 and "Traceback" not in err
    assert "split 'train' has images of 1 class(es) ['covid']" in err and "at least two classes" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry", [False, True])
def test_class_map_merging_every_class_is_exit_2(tmp_path: Path, capsys, dry: bool) -> None:
    root = make_tree(tmp_path / "data")
    spec = write_spec(tmp_path, {"root": str(root), "class_map": {"covid": "sick", "normal": "sick"}})
    rc, out, err = run(capsys, spec, *(["--dry-run"] if dry else []))
    assert rc == 2 and "Traceback" not in err
    assert "split 'test' has images of 1 class(es) ['sick'] (folders ['covid', 'normal'] merged by data.class_map)" \
        in err
    assert not (tmp_path / "out").exists()


def test_synthetic_classes_merged_into_one_is_a_spec_error(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path, {"synthetic": {"classes": ["a", "b"], "train": 4, "validation": 2, "test": 2},
                                 "class_map": {"a": "x", "b": "x"}})
    rc, out, err = run(capsys, spec)
    assert rc == 2 and "data.class_map merges every class" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before the synthetic data is generated


def test_duplicates_are_listed_by_the_dry_run(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root)}), "--dry-run")
    assert rc == 0, err
    assert "duplicates: 1 validation image also in train, 1 test image also in train (data.on_duplicate: warn" in out
    assert "test/covid/copy.png = train/covid/covid_0.png" in out
    assert "validation/normal/copy.bmp = train/normal/normal_1.png" in out  # other bytes, same pixels
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root), "on_duplicate": "error"}), "--dry-run")
    assert rc == 2 and "data.on_duplicate: error and 1 validation image also in train" in err
    assert not (tmp_path / "out").exists()


def test_no_duplicates_is_said_so(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "data")
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root)}), "--dry-run")
    assert rc == 0 and "duplicates: no image of validation or test is also in an earlier split" in out


@pytest.mark.parametrize("cache", [True, False])
def test_on_duplicate_error_is_exit_2_listing_them_and_leaves_nothing(tmp_path: Path, capsys, cache: bool) -> None:
    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root), "on_duplicate": "error", "cache": cache}))
    assert rc == 2 and "Traceback" not in err
    assert "test/covid/copy.png = train/covid/covid_0.png (test image also in train)" in err
    assert "validation/normal/copy.bmp = train/normal/normal_1.png (validation image also in train)" in err
    assert not (tmp_path / "out").exists()  # the decoded cache this run wrote is gone again


def test_on_duplicate_error_keeps_an_earlier_cache(tmp_path: Path, capsys) -> None:
    """Only what the refused run wrote is removed: a cache folder that was there stays as it was."""
    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    old = tmp_path / "out" / "cache" / "old.npy"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    rc, _, err = run(capsys, write_spec(tmp_path, {"root": str(root), "on_duplicate": "error"}))
    assert rc == 2 and "(test image also in train)" in err
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["cache", "old.npy"]


def test_on_duplicate_drop_removes_them_from_the_later_split(tmp_path: Path) -> None:
    from covid_tune.spec.load import load_spec

    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    index, decoded, _ = run_mod.prepare(load_spec(write_spec(tmp_path, {"root": str(root), "on_duplicate": "drop"})))
    assert [len(index.splits[s]) for s in ("train", "validation", "test")] == [8, 8, 8]
    assert not any("copy" in p for s in index.splits for p in index.paths(s))
    assert index.duplicates.action == "drop" and index.duplicates.total == 2
    assert len(decoded["validation"]) == 8 and len(decoded["train"]) == 8
    # the kept rows are the pixels of the kept files
    from covid_tune.data.cache import decode_resized

    kept = index.paths("validation")
    assert np.array_equal(decoded["validation"][3], decode_resized(kept[3], 32, True))


def test_drop_that_empties_a_class_is_exit_2(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "data", n=1)
    for cls in ("covid", "normal"):  # every validation image is a copy of a train image
        shutil.copy(root / "train" / cls / f"{cls}_0.png", root / "validation" / cls / f"{cls}_0.png")
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root), "on_duplicate": "drop"}))
    assert rc == 2 and "after data.on_duplicate: drop removed 2 validation images also in train" in err
    assert "split 'validation' has images of 0 class(es)" in err
    assert not (tmp_path / "out").exists()


def test_duplicates_without_the_cache_match_those_with_it(tmp_path: Path) -> None:
    from covid_tune.data.cache import build_decoded_cache, find_duplicates
    from covid_tune.data.dataset import scan_dataset

    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    index = scan_dataset(root)
    plain = find_duplicates(index, 32, True)
    decoded = build_decoded_cache(index, 32, True, tmp_path / "cache", splits=("train", "validation"))
    cached = find_duplicates(index, 32, True, decoded, tmp_path / "cache", store=True)
    assert plain.pairs == cached.pairs and plain.total == 2
    assert len(list((tmp_path / "cache").glob("test-*.npy"))) == 1  # test stored for the next run
    again = find_duplicates(index, 32, True, None, tmp_path / "cache", store=False)  # all read back
    assert again.pairs == plain.pairs


def test_report_line_and_rebuild_use_the_recorded_duplicates(tmp_path: Path) -> None:
    from covid_tune.data.cache import find_duplicates
    from covid_tune.data.dataset import Duplicates, scan_dataset
    from covid_tune.report import build as report_mod
    from covid_tune.report.sections import duplicates_lines

    root = make_tree(tmp_path / "data")
    add_duplicates(root)
    dups = find_duplicates(scan_dataset(root), 32, True)
    report_mod.save_data_checks(tmp_path, dups)
    checks = report_mod.load_data_checks(tmp_path)
    assert Duplicates.from_dict(checks["duplicates"]).pairs == dups.pairs
    text = "\n".join(duplicates_lines(checks))
    assert "1 validation image also in train, 1 test image also in train" in text
    assert "`test/covid/copy.png = train/covid/covid_0.png`" in text and "data.on_duplicate: warn" in text
    assert duplicates_lines(None) == []
    # a rebuilt report evaluates on what the sweep used: with drop recorded, the copies are left out
    from covid_tune.spec.load import load_spec

    spec = load_spec(write_spec(tmp_path, {"root": str(root), "on_duplicate": "drop"}))
    assert sum(len(v) for v in report_mod.sweep_index(spec, checks).splits.values()) == 26  # warn: kept
    dups.action = "drop"
    report_mod.save_data_checks(tmp_path, dups)
    index = report_mod.sweep_index(spec, report_mod.load_data_checks(tmp_path))
    assert [len(index.splits[s]) for s in ("train", "validation", "test")] == [8, 8, 8]
    assert "removed from the later split" in "\n".join(duplicates_lines(report_mod.load_data_checks(tmp_path)))


# A sweep on such a folder names them on the console, in REPORT.md and data-checks.json:
# tests/test_console.py::test_compact_console_of_a_small_sweep (one sweep for both).


# --- 13. true as a number; weights a folder -----------------------------------------------------

@pytest.mark.parametrize("override,key", [("resources.cpus=true", "resources.cpus"),
                                          ("trainer.epochs=true", "trainer.epochs"),
                                          ("grid.seed=[0,false]", "grid.seed.1"),
                                          ("data.image_size=false", "data.image_size")])
def test_boolean_where_a_number_belongs_is_exit_2_naming_the_key(tmp_path: Path, capsys, override, key) -> None:
    root = make_tree(tmp_path / "data", n=1)
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root)}), "--set", override)
    assert rc == 2 and f"{key}: expected a number, got the boolean" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_numbers_still_pass(tmp_path: Path) -> None:
    from covid_tune.spec.load import load_spec

    root = make_tree(tmp_path / "data", n=1)
    spec = load_spec(write_spec(tmp_path, {"root": str(root)}), ["resources.cpus=2", "trainer.lr=1", "grid.seed=[0,1]"])
    assert spec.resources.cpus == 2.0 and spec.trainer.lr == 1.0 and spec.grid.seed == [0, 1]


@pytest.mark.parametrize("dry", [False, True])
def test_weights_that_is_a_directory_is_named_as_one(tmp_path: Path, capsys, dry: bool) -> None:
    root = make_tree(tmp_path / "data", n=1)
    folder = tmp_path / "weights"
    folder.mkdir()
    rc, out, err = run(capsys, write_spec(tmp_path, {"root": str(root)}), "--set", f"trainer.weights={folder}",
                       *(["--dry-run"] if dry else []))
    assert rc == 2 and "Traceback" not in err
    assert f"{folder} is a directory, expected a state_dict file (.pt/.pth)" in err and "does not exist" not in err
    assert not (tmp_path / "out").exists()
