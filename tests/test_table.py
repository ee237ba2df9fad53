"""Label tables (data.labels + data.columns): single- and multi-label CSVs, splits by patient (seeded,
stratified, no patient in two splits, written to the output), refused rows as exit-2 messages, the spec's
one-line checks, one engine epoch on each kind, and (slow) a sweep on a multi-label CSV of DICOM files."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_image
from engine_helpers import CPU, TINY_HP

from covid_tune.cli import run as run_mod
from covid_tune.data.dataset import SPLITS, DatasetError, index_targets
from covid_tune.data.table import LabelTable, scan_table, split_by_patient, write_splits

CLASSES = ("effusion", "nodule", "normal")


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def single_table(root: Path, patients: int = 10, per_patient: int = 2) -> Path:
    """root/images/pNN_i.png and root/labels.csv (Image, Finding, PatientID): one label per patient."""
    rows = []
    for c, cls in enumerate(("covid", "normal")):
        for p in range(patients):
            for i in range(per_patient):
                name = f"images/{cls}{p:02d}_{i}.png"
                write_image(root / name, seed=1000 * c + 10 * p + i, size=16)
                rows.append([name, cls, f"{cls}-{p}"])
    return write_csv(root / "labels.csv", ["Image", "Finding", "PatientID"], rows)


def multi_rows(patients: int = 8) -> list[tuple[str, list[str], str]]:
    """(file name, labels, patient): every label set of CLASSES' first two, and normal alone."""
    sets = [["effusion"], ["nodule"], ["effusion", "nodule"], ["normal"]]
    return [(f"img{k:02d}_{p:02d}", s, f"pat{k}{p}") for k, s in enumerate(sets) for p in range(patients)]


def multi_table(root: Path, style: str, ext: str = "png") -> Path:
    """A multi-label CSV: 0/1 columns (``style='columns'``) or NIH's ``a|b`` cells (``style='separator'``)."""
    rows = []
    for name, labels, patient in multi_rows():
        rel = f"img/{name}.{ext}"
        if ext == "png":
            write_image(root / rel, seed=hash(name) % 1000, size=16)
        if style == "columns":
            rows.append([rel, patient] + [int(c in labels) for c in CLASSES])
        else:
            rows.append([rel, patient, "|".join(labels)])
    header = ["file", "patient"] + (list(CLASSES) if style == "columns" else ["Finding Labels"])
    return write_csv(root / "labels.csv", header, rows)


def table(csv_path: Path, **kw) -> LabelTable:
    return LabelTable(csv=csv_path, root=csv_path.parent, **kw)


# --- splits by patient ---------------------------------------------------------------------------------

def test_single_label_table_split_by_patient(tmp_path: Path) -> None:
    t = table(single_table(tmp_path / "d"), path="Image", label="Finding", patient="PatientID", seed=3)
    index = scan_table(t)
    assert index.classes == ["covid", "normal"] and index.hot is None
    where = {}
    for split in SPLITS:
        for patient in index.patients[split]:
            where.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in where.values())  # no patient in two splits
    assert len(where) == 20
    # stratified: 10 patients of each class cut at floor(7 + .5) = 7 and floor(8.5 + .5) = 9: 7, 2, 1 patients
    counts = index.counts()
    assert counts["train"] == {"covid": 14, "normal": 14}
    assert counts["validation"] == {"covid": 4, "normal": 4} and counts["test"] == {"covid": 2, "normal": 2}
    again = scan_table(t)
    assert again.splits == index.splits  # seeded: the same split every time
    other = scan_table(replace(t, seed=4))
    assert other.splits != index.splits


def test_split_by_patient_fractions_and_strata() -> None:
    patients = [f"p{i}" for i in range(200)]
    strata = ["a" if i < 150 else "b" for i in range(200)]
    out = split_by_patient(patients, strata, (0.6, 0.2, 0.2), seed=0)
    for stratum, n in (("a", 150), ("b", 50)):
        got = [out[p] for p, s in zip(patients, strata) if s == stratum]
        assert [got.count(s) for s in SPLITS] == [round(n * 0.6), round(n * 0.2), n - round(n * 0.6) - round(n * 0.2)]


def test_splits_written_and_read_back(tmp_path: Path) -> None:
    t = table(single_table(tmp_path / "d"), path="Image", label="Finding", patient="PatientID")
    index = scan_table(t)
    path = write_splits(index, tmp_path / "out" / "splits.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    for split in SPLITS:
        assert [r["path"] for r in rows if r["split"] == split] == [
            Path(p).relative_to(t.root).as_posix() for p in index.paths(split)]
    # the file is itself a table with a split column: the same split, without the fractions
    labels = {r[0]: r[1] for r in csv.reader(open(t.csv))}
    write_csv(tmp_path / "d" / "fixed.csv", ["Image", "Finding", "PatientID", "split"],
              [[r["path"], labels[r["path"]], r["patient"], r["split"]] for r in rows])
    fixed = scan_table(replace(t, csv=tmp_path / "d" / "fixed.csv", split="split", seed=99))
    assert fixed.splits == index.splits


# --- multi-label ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["columns", "separator"])
def test_multi_label_table_rows(tmp_path: Path, style: str) -> None:
    csv_path = multi_table(tmp_path / "d", style)
    kw = {"labels": CLASSES} if style == "columns" else {"label": "Finding Labels", "separator": "|"}
    index = scan_table(table(csv_path, path="file", patient="patient", **kw))
    assert index.classes == list(CLASSES) and index.hot is not None
    expected = {f"img/{n}.png": labels for n, labels, _ in multi_rows()}
    for split in SPLITS:
        for path, row in zip(index.paths(split), index.hot[split]):
            rel = Path(path).relative_to(tmp_path / "d").as_posix()
            assert [c for c, v in zip(CLASSES, row) if v] == expected[rel]
    targets = index_targets(index, "train", "multi", {"nodule": ["effusion"]})
    nodule, effusion = CLASSES.index("nodule"), CLASSES.index("effusion")
    assert (targets[targets[:, nodule] == 1, effusion] == 1).all()  # implies applied
    assert index.counts()["train"]["effusion"] == int(index.hot["train"][:, effusion].sum())


# --- refused rows: messages, and exit 2 from the command ------------------------------------------------

def test_missing_file_names_line_and_file(tmp_path: Path) -> None:
    csv_path = single_table(tmp_path / "d")
    (tmp_path / "d" / "images" / "covid03_1.png").unlink()
    with pytest.raises(DatasetError) as info:
        scan_table(table(csv_path, path="Image", label="Finding", patient="PatientID"))
    assert info.value.problems == [f"labels.csv line 9: file images/covid03_1.png does not exist "
                                   f"(looked for {tmp_path / 'd' / 'images' / 'covid03_1.png'})"]


def test_unknown_label_values_are_named(tmp_path: Path) -> None:
    csv_path = multi_table(tmp_path / "d", "columns")
    rows = list(csv.reader(open(csv_path)))
    rows[3][2] = "-1"  # CheXpert's "uncertain"
    write_csv(csv_path, rows[0], rows[1:])
    with pytest.raises(DatasetError) as info:
        scan_table(table(csv_path, path="file", patient="patient", labels=CLASSES))
    assert info.value.problems == ["labels.csv line 4: column 'effusion' has '-1'; allowed: 0 or 1 (map uncertain "
                                   "or blank values to 0 or 1 first)"]
    single = single_table(tmp_path / "s")
    with pytest.raises(DatasetError, match="line 2: column 'Finding' has 'covid'; allowed: normal, pneumonia"):
        scan_table(table(single, path="Image", label="Finding", classes=("normal", "pneumonia")))


def test_patient_in_two_splits_of_the_split_column_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(2):
        write_image(root / f"{i}.png", seed=i, size=8)
    csv_path = write_csv(root / "t.csv", ["p", "y", "pid", "s"],
                         [["0.png", "a", "x", "train"], ["1.png", "b", "x", "test"]])
    with pytest.raises(DatasetError, match="patient 'x' has images in splits \\['test', 'train'\\]"):
        scan_table(table(csv_path, path="p", label="y", patient="pid", split="s"))


def write_spec(tmp_path: Path, data: dict, **sections) -> Path:
    raw = {"name": "table", "output": str(tmp_path / "out"), "data": {"image_size": 32, "augment": False, **data},
           "grid": {"backbone": ["tiny_cnn"], "freeze": ["none"]},
           "trainer": {"epochs": 1, "weights": "none", "head_hidden": 8, "batch_size": 8},
           "scheduler": {"grace_period": 1}, "resources": {"cpus": 1, "gpu": 0}, **sections}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("dry", [False, True])
def test_missing_file_and_unknown_value_are_exit_2(tmp_path: Path, capsys, dry: bool) -> None:
    csv_path = multi_table(tmp_path / "d", "separator")
    rows = list(csv.reader(open(csv_path)))
    rows[2][2] = "effusion|Cardiomegaly"
    write_csv(csv_path, rows[0], rows[1:])
    (tmp_path / "d" / rows[5][0]).unlink()
    spec = write_spec(tmp_path, {"labels": str(csv_path), "label_mode": "multi",
                                 "columns": {"path": "file", "label": "Finding Labels", "separator": "|",
                                             "patient": "patient", "classes": list(CLASSES)}},
                      grid={"backbone": ["tiny_cnn"], "loss": ["bce"]})
    rc = run_mod.main([str(spec)] + (["--dry-run"] if dry else []))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "labels.csv line 3: column 'Finding Labels' has 'Cardiomegaly'; allowed: effusion, nodule, normal" in err
    assert f"labels.csv line 6: file {rows[5][0]} does not exist" in err
    assert not (tmp_path / "out" / "splits.csv").exists()


@pytest.mark.parametrize("columns, extra, words", [
    ({"path": "f"}, {}, "give exactly one of data.columns.label (a label column) or data.columns.labels"),
    ({"path": "f", "label": "y", "labels": ["a", "b"]}, {}, "give exactly one of data.columns.label"),
    ({"path": "f", "labels": ["a", "b"]}, {}, "is multi-label: set data.label_mode: multi"),
    ({"path": "f", "labels": ["a", "b"], "separator": "|"}, {"label_mode": "multi"}, "separator goes with"),
    ({"path": "f", "label": "y"}, {"splits": {"train": 0.8, "validation": 0.2, "test": 0.2}},
     "train + validation + test must be 1, got 1.2"),
    ({"path": "f", "label": "y", "patient_id": "p"}, {}, "patient_id"),
])
def test_spec_checks_columns_in_one_message(tmp_path: Path, capsys, columns: dict, extra: dict, words: str) -> None:
    spec = write_spec(tmp_path, {"labels": str(tmp_path / "t.csv"), "columns": columns, **extra})
    rc = run_mod.main([str(spec), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err


def test_labels_without_columns_is_a_spec_error(tmp_path: Path, capsys) -> None:
    rc = run_mod.main([str(write_spec(tmp_path, {"labels": "t.csv"})), "--dry-run"])
    assert rc == 2 and "data.labels (a CSV) and data.columns (which column is what) go together" in \
        capsys.readouterr().err


# --- training on a table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["single", "columns"])
def test_one_engine_epoch_on_a_table(tmp_path: Path, style: str) -> None:
    from covid_tune.data.cache import build_decoded_cache
    from covid_tune.engine.training import TrainingRun

    if style == "single":
        index = scan_table(table(single_table(tmp_path / "d"), path="Image", label="Finding", patient="PatientID"))
        hp = replace(TINY_HP, batch_size=4)
    else:
        index = scan_table(table(multi_table(tmp_path / "d", "columns"), path="file", patient="patient",
                                 labels=CLASSES))
        hp = replace(TINY_HP, batch_size=4, label_mode="multi", loss="bce")
    decoded = build_decoded_cache(index, 32, True, splits=("train", "validation"))
    metrics = TrainingRun(hp, index, CPU, decoded=decoded).run_epoch()
    assert np.isfinite(metrics["val_loss"]) and 0 <= metrics["val_acc"] <= 1


@pytest.mark.slow
def test_sweep_on_a_multi_label_table_of_dicom_files(tmp_path: Path) -> None:
    """End to end: `covid-tune run` on a CSV (NIH-style `a|b` cells, patient column, no split column) whose
    images are DICOM (12-bit, MONOCHROME1 and 2): trains, writes splits.csv and a report."""
    pytest.importorskip("pydicom")
    from dicom_helpers import write_dicom

    root = tmp_path / "d"
    csv_path = multi_table(root, "separator", ext="dcm")
    rng = np.random.default_rng(0)
    for i, (name, labels, _) in enumerate(multi_rows()):
        pixels = rng.integers(0, 1500, (24, 24)) + 2000 * ("effusion" in labels) * (np.arange(24) > 12)
        write_dicom(root / "img" / f"{name}.dcm", pixels, bits_stored=12,
                    photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", window=(2048, 4096) if i % 3 else None)
    spec = write_spec(tmp_path, {"labels": str(csv_path), "label_mode": "multi",
                                 "columns": {"path": "file", "label": "Finding Labels", "separator": "|",
                                             "patient": "patient"}, "splits": {"seed": 1}},
                      grid={"backbone": ["tiny_cnn"], "freeze": ["none"], "loss": ["bce"]},
                      report={"shortcut_check": False, "gradcam": {"per_class": 1}})
    assert run_mod.main([str(spec), "-q"]) == 0
    out = tmp_path / "out"
    with open(out / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(multi_rows()) and {r["split"] for r in rows} == set(SPLITS)
    assert all(r["path"].endswith(".dcm") for r in rows)
    report = (out / "report" / "REPORT.md").read_text()
    assert "effusion, nodule, normal" in report


def test_resume_with_a_changed_label_table_is_refused(tmp_path: Path) -> None:
    """The resume guard's data record covers the table's rows: another label for one image is other data."""
    from covid_tune.spec.load import load_spec
    from covid_tune.sweep import resume_guard

    csv_path = single_table(tmp_path / "d")
    spec = load_spec(write_spec(tmp_path, {"labels": str(csv_path), "root": str(tmp_path / "d"),
                                           "columns": {"path": "Image", "label": "Finding", "patient": "PatientID"}}))
    spec.output_dir.mkdir(parents=True)
    resume_guard.record_data(spec, tmp_path / "d")
    assert resume_guard.check_data(spec, tmp_path / "d") is None
    rows = list(csv.reader(open(csv_path)))
    rows[1][1] = "normal" if rows[1][1] == "covid" else "covid"
    write_csv(csv_path, rows[0], rows[1:])
    problem = resume_guard.check_data(spec, tmp_path / "d")
    assert problem and "the files under" in problem and "or the label table" in problem
