"""Grouped cross-validation folds (data.folds, data.group_by): the folds, the fold trials' views, the plan,
the spec's messages and the pre-flight's refusal of a group that crosses into test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, cli_here, write_image

from covid_tune.data.cache import build_decoded_cache
from covid_tune.data.dataset import scan_dataset
from covid_tune.data.folds import FoldError, assign_folds, crossing_groups, fold_view, image_groups, with_folds
from covid_tune.spec.load import SpecError, validate
from covid_tune.spec.plan import expand, plan_table


def make_tree(root: Path, per_class: dict[str, int], patients_per_image: int = 2, cross: bool = False) -> Path:
    """An ImageFolder tree of 2 classes whose manifest gives every ``patients_per_image`` images one patient
    (the patient's name also starts the file name: ``p<N>_<i>.png``); ``cross`` puts one patient of train in
    test too."""
    rows, n = [], 0
    for split, count in per_class.items():
        for cls in ("infected", "normal"):
            for i in range(count):
                patient = f"{split[:2]}{cls[0]}{i // patients_per_image}"
                if cross and split == "test" and i == 0:
                    patient = f"tr{cls[0]}0"
                rel = f"{split}/{cls}/{patient}_{i}.png"
                write_image(root / rel, seed=n, size=20)
                rows.append({"file": rel, "class": cls, "split": split, "patient_group": patient})
                n += 1
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("folds") / "d", {"train": 12, "validation": 6, "test": 4})


def pooled_groups(index, group_by: str = "patient_group") -> np.ndarray:
    g = image_groups(index, group_by)
    return np.asarray(g["train"] + g["validation"])


def test_no_group_in_two_folds_and_every_pooled_image_in_exactly_one(tree: Path) -> None:
    index = with_folds(scan_dataset(tree), 3, "patient_group", seed=1)
    groups = pooled_groups(index)
    assert len(index.folds) == len(groups) == 36 and set(index.folds.tolist()) == {0, 1, 2}
    for g in set(groups.tolist()):
        assert len(set(index.folds[groups == g].tolist())) == 1, g
    # each pooled image is validated in exactly one fold view, and trained on in the others
    seen: dict[str, int] = {}
    for k in range(3):
        view, _ = fold_view(index, None, k)
        for p in view.paths("validation"):
            seen[p] = seen.get(p, 0) + 1
        assert not set(view.paths("train")) & set(view.paths("validation"))
        assert len(view.paths("train")) + len(view.paths("validation")) == 36
        assert view.splits["test"] == index.splits["test"]  # test never in a fold
    assert sorted(seen) == sorted(index.paths("train") + index.paths("validation"))
    assert set(seen.values()) == {1}
    assert not set(seen) & set(index.paths("test"))


def test_same_seed_same_folds_other_seed_other_folds(tree: Path) -> None:
    a = with_folds(scan_dataset(tree), 3, "patient_group", seed=5).folds
    b = with_folds(scan_dataset(tree), 3, "patient_group", seed=5).folds
    c = with_folds(scan_dataset(tree), 3, "patient_group", seed=6).folds
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_folds_are_stratified_group_k_fold(tree: Path) -> None:
    from sklearn.model_selection import StratifiedGroupKFold

    index = scan_dataset(tree)
    labels = np.concatenate([index.labels("train"), index.labels("validation")])
    groups = pooled_groups(index)
    expected = np.full(len(labels), -1)
    for k, (_, held) in enumerate(StratifiedGroupKFold(3, shuffle=True, random_state=2).split(labels, labels, groups)):
        expected[held] = k
    assert np.array_equal(assign_folds(labels, groups, 3, 2), expected)


def test_regex_and_none_groups(tree: Path) -> None:
    index = scan_dataset(tree)
    by_name = image_groups(index, r"re:^([a-z]+\d+)_")
    assert by_name["train"][:2] == ["tri0", "tri0"]
    assert by_name == image_groups(index, "patient_group")
    assert image_groups(index, "none")["train"][0].endswith(".png")
    with pytest.raises(FoldError, match="matches no group in"):
        image_groups(index, r"re:^zzz")
    with pytest.raises(FoldError, match="has no column 'site'"):
        image_groups(index, "site")


def test_fold_view_cuts_the_decoded_arrays_without_decoding(tree: Path) -> None:
    index = with_folds(scan_dataset(tree), 3, "patient_group")
    decoded = build_decoded_cache(index, 16, True, splits=("train", "validation"))
    pooled = np.concatenate([decoded["train"], decoded["validation"]])
    paths = index.paths("train") + index.paths("validation")
    view, cut = fold_view(index, decoded, 1)
    cut.check(view, 16, True)
    held = index.folds == 1
    assert np.array_equal(cut["validation"], pooled[held]) and np.array_equal(cut["train"], pooled[~held])
    assert view.paths("validation") == [p for p, h in zip(paths, held) if h]
    assert cut.keys["train"] != decoded.keys["train"]  # a feature cache of one fold is never another's


def test_crossing_group_refused(tmp_path: Path) -> None:
    index = scan_dataset(make_tree(tmp_path / "d", {"train": 6, "validation": 2, "test": 2}, cross=True))
    assert crossing_groups(image_groups(index, "patient_group")) == ["tri0", "trn0"]
    with pytest.raises(FoldError, match=r"2 group\(s\) in both test and train/validation, e.g. tri0, trn0"):
        with_folds(index, 2, "patient_group")


def fold_raw(tiny_raw: dict, **data) -> dict:
    raw = {**tiny_raw, "data": {**tiny_raw["data"], **data}}
    raw["grid"] = {**raw["grid"], "seed": [0, 1], "freeze": ["none"]}
    return raw


def test_plan_has_a_trial_per_fold_and_seed_in_one_group(tiny_raw: dict) -> None:
    plan = expand(validate(fold_raw(tiny_raw, folds=3, group_by="none")))
    assert list(plan) == [f"tiny_cnn-none-ce-f{f}-s{s}" for f in range(3) for s in (0, 1)]
    assert {h.group for h in plan.values()} == {"tiny_cnn-none-ce"}
    assert [h.fold for h in plan.values()] == [0, 0, 1, 1, 2, 2]
    assert "Fold" in plan_table(plan)
    # without folds nothing changes: the ids stay as they were
    plain = expand(validate(fold_raw(tiny_raw)))
    assert list(plain) == ["tiny_cnn-none-ce-s0", "tiny_cnn-none-ce-s1"] and {h.fold for h in plain.values()} == {None}
    assert "Fold" not in plan_table(plain)


@pytest.mark.parametrize(("data", "needles"), [
    ({"folds": 1, "group_by": "none"}, ["data.folds", "greater than or equal to 2"]),
    ({"folds": 3}, ["data.folds needs data.group_by", "re:PATTERN"]),
    ({"group_by": "patient_group"}, ["data.group_by goes with data.folds"]),
    ({"folds": 3, "group_by": "re:(unclosed"}, ["data.group_by", "does not compile", "re:PATTERN or none"]),
])
def test_spec_messages(tiny_raw: dict, data: dict, needles: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        validate(fold_raw(tiny_raw, **data))
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_resume_refuses_other_fold_settings(tmp_path: Path) -> None:
    """A fold trial resumed under another data.group_by or data.fold_seed would validate on images it
    trained on: the resume guard's data record holds them (only with folds: other sweeps' records stay)."""
    from covid_tune.sweep import resume_guard

    root = make_tree(tmp_path / "d", {"train": 4, "validation": 2, "test": 2})

    def spec(**data):
        return validate({"name": "cv", "data": {"root": str(root), **data}, "grid": {"backbone": "tiny_cnn"},
                         "trainer": {"weights": "none"}, "output": str(tmp_path / "out")})

    first = spec(folds=2, group_by="patient_group")
    first.output_dir.mkdir(parents=True)
    resume_guard.record_data(first, root)
    assert resume_guard.check_data(first, root) is None
    for changed, needle in [({"fold_seed": 1}, "data.fold_seed: 0 -> 1"),
                            ({"group_by": "none"}, "data.group_by: 'patient_group' -> 'none'")]:
        problem = resume_guard.check_data(spec(**{"folds": 2, "group_by": "patient_group", **changed}), root)
        assert problem and problem.startswith("--resume: the data differ") and needle in problem, problem
    plain = spec()
    resume_guard.record_data(plain, root)
    assert "fold_seed" not in resume_guard.data_digest(plain, root)["settings"]
    assert resume_guard.check_data(plain, root) is None


def dry_run(tmp_path: Path, root: Path, group_by: str) -> subprocess.CompletedProcess:
    spec = {"name": "cv", "data": {"root": str(root), "folds": 2, "group_by": group_by, "image_size": 32},
            "grid": {"backbone": "tiny_cnn", "freeze": "none"}, "trainer": {"epochs": 1, "weights": "none"},
            "output": str(tmp_path / "out")}
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "covid_tune", "run", str(path), "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_folds_and_refuses_a_crossing_group(tmp_path: Path) -> None:
    good = make_tree(tmp_path / "good", {"train": 6, "validation": 2, "test": 2})
    proc = dry_run(tmp_path, good, "patient_group")
    assert proc.returncode == 0, proc.stderr
    assert "folds: 2 of train + validation by patient_group" in proc.stdout
    assert "fold 0:" in proc.stdout and "fold 1:" in proc.stdout and "Traceback" not in proc.stderr
    bad = make_tree(tmp_path / "bad", {"train": 6, "validation": 2, "test": 2}, cross=True)
    proc = dry_run(tmp_path, bad, "patient_group")
    assert proc.returncode == 2 and "group(s) in both test and train/validation" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fold_sweep_end_to_end(tmp_path: Path, capsys) -> None:
    """folds 2 x 1 configuration x 1 seed on a tiny tree with a manifest: 2 trials, the report's CV section,
    the ensemble of both folds evaluated and taken by predict."""
    import json

    root = make_tree(tmp_path / "d", {"train": 8, "validation": 4, "test": 4})
    spec = {"name": "cv", "data": {"root": str(root), "folds": 2, "group_by": "patient_group", "image_size": 32,
                                   "augment": False},
            "grid": {"backbone": "tiny_cnn", "freeze": "none"},
            "trainer": {"epochs": 2, "weights": "none", "batch_size": 8, "head_hidden": 8, "lr": 0.01},
            "scheduler": {"metric": "val_loss", "asha": False}, "resources": {"cpus": 1},
            "report": {"shortcut_check": False, "gradcam": {"per_class": 0}}, "output": str(tmp_path / "out")}
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "covid_tune", "run", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    trials = json.loads((out / "trials.json").read_text())
    assert sorted(trials) == ["tiny_cnn-none-ce-f0-s0", "tiny_cnn-none-ce-f1-s0"]
    assert {t["status"] for t in trials.values()} == {"ok"}
    # each fold's model was validated on its own held-out fold: together every pooled image once
    files = []
    for cid in trials:
        ev = json.loads((out / "best" / cid / "eval.json").read_text())
        files.append(ev["splits"]["validation"]["n"])
    assert sum(files) == 24
    md = (out / "report" / "REPORT.md").read_text()
    assert "## Cross-validation" in md and "### Ensembles" in md
    results = json.loads((out / "report" / "results.json").read_text())
    cv = results["cross_validation"]["tiny_cnn-none-ce"]
    assert cv["k"] == 2 and cv["oof"]["n"] == 24
    ens = out / "best" / "tiny_cnn-none-ce" / "ensemble"
    assert (ens / "eval.json").is_file() and results["ensembles"]["tiny_cnn-none-ce"]["members"] == 2
    pred = cli_here(capsys, "predict", str(out), str(root / "test"))  # no Ray: in this process
    assert pred.returncode == 0 and "ensemble" in pred.stderr, pred.stderr[-2000:]
