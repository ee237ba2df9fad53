"""The course study: part 1 / part 2 grids, multi-label reports, seeds, per-source results on real data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CXR_REAL, REPO, load_sweep, needs_cxr_real, parse_markdown_table, shrink
from PIL import Image

from covid_tune.spec.load import validate
from covid_tune.spec.plan import expand, plan_table

PART1_LAYERS = {
    "vgg16": ["Only FC layers unfrozen", "Conv blocks 1-3 frozen", "Conv blocks 1-2 frozen", "Entire network unfrozen"],
    "resnet18": ["Only FC unfrozen", "Stem + layer1-3 frozen", "Stem + layer1 frozen", "Entire network unfrozen"],
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tune", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def plan_rows(spec: str) -> list[list[str]]:
    """The rows of the trial grid as --dry-run prints it (tests/test_sweeps.py dry-runs every spec)."""
    lines = [ln for ln in plan_table(expand(validate(load_sweep(spec)))).splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_part1_grid_lists_the_course_eight_rows() -> None:
    rows = plan_rows("part1.yaml")
    assert len(rows) == 8
    got = {(r[2], r[3]) for r in rows}
    assert got == {(b, label) for b, labels in PART1_LAYERS.items() for label in labels}
    assert {r[4] for r in rows} == {"ce"}


def test_part2_grid_lists_backbone_by_loss() -> None:
    rows = plan_rows("part2.yaml")
    assert len(rows) == 4
    assert {(r[2], r[4]) for r in rows} == {(b, loss) for b in ("vgg16", "resnet18") for loss in ("bce", "focal")}
    assert {r[3] for r in rows} == {"Entire network unfrozen"}


def test_course_defaults_in_part_specs() -> None:
    p1 = validate(load_sweep("part1.yaml"))
    assert (p1.trainer.optimizer, p1.trainer.lr, p1.trainer.momentum, p1.trainer.batch_size) == ("sgd", 1e-3, 0.9, 40)
    t = p1.trainer
    assert (t.epochs, t.head_hidden, t.dropout, t.weights) == (24, 240, 0.5, "imagenet")
    p2 = validate(load_sweep("part2.yaml"))
    assert p2.data.label_mode == "multi" and p2.data.implies == {"covid": ["pneumonia"]} and p2.data.threshold == 0.5
    assert p2.trainer.batch_size == 64 and p2.trainer.focal_gamma == 2.0
    # seeds multiply the grid
    part2 = load_sweep("part2.yaml")
    assert len(expand(validate({**part2, "grid": {**part2["grid"], "seed": [0, 1, 2]}}))) == 12



def test_cxr_real_spec_is_the_measured_study() -> None:
    # docs/model-selection.md measured these choices (benchmarks/selection.py); a change must be re-measured
    spec = validate(load_sweep("cxr-real.yaml"))
    t = spec.trainer
    assert (t.optimizer, t.lr, t.lr_schedule, t.epochs, t.head_hidden) == ("adam", 1e-3, "cosine", 12, 0)
    assert spec.scheduler.select == "ema" and spec.data.augment == "none"
    assert (spec.data.folds, spec.data.group_by, spec.scheduler.asha) == (5, "patient_group", False)
    plan = expand(spec)
    assert len(plan) == 10 and {p.fold for p in plan.values()} == set(range(5))
    assert {p.freeze for p in plan.values()} == {"layer1", "none"}


@pytest.fixture(scope="module")
def part2_run(tmp_path_factory) -> Path:
    """Part 2 shrunk: synthetic covid/normal/pneumonia, tiny CNN, BCE and focal, two seeds."""
    tmp = tmp_path_factory.mktemp("part2")
    raw = shrink(load_sweep("part2.yaml"), tmp, trainer={"epochs": 2, "batch_size": 16, "head_hidden": 16,
                                                           "weights": "none", "lr": 0.05})
    raw["data"].pop("root")
    raw["data"]["synthetic"] = {"classes": ["covid", "normal", "pneumonia"], "train": 16, "validation": 8,
                                "test": 8, "image_size": 36}
    raw["grid"].update(backbone=["tiny_cnn"], seed=[0, 1])
    path = tmp / "part2.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(raw["output"])


@pytest.mark.slow
def test_part2_multilabel_report(part2_run: Path) -> None:
    report = part2_run / "report"
    csv = pd.read_csv(report / "results.csv")
    assert len(csv) == 4 and set(csv["loss"]) == {"bce", "focal"}
    data = json.loads((report / "results.json").read_text())
    assert data["classes"] == ["covid", "normal", "pneumonia"]
    for row in data["rows"]:
        for split in ("train", "validation", "test"):
            ev = row["eval"][split]
            mcm = np.asarray(ev["confusion"])
            assert mcm.shape == (3, 2, 2)
            assert (mcm.sum(axis=(1, 2)) == ev["n"]).all()
            assert len(ev["f1_per_class"]) == 3
            # implies: every covid image is also a positive for pneumonia, so pneumonia's positives
            # (fn + tp) are the covid and pneumonia images together
            per_class = {"train": 16, "validation": 8, "test": 8}[split]
            assert mcm[0, 1].sum() == per_class and mcm[2, 1].sum() == 2 * per_class
            assert ev["f1"] == pytest.approx(ev["f1_weighted"])
            key = "confusion" if split == "test" else f"confusion_{split}"
            png = report / "figures" / f"{row['config_id']}_{key}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 100


@pytest.mark.slow
def test_seed_groups_show_mean_and_std(part2_run: Path) -> None:
    md = (part2_run / "report" / "REPORT.md").read_text()
    csv = pd.read_csv(part2_run / "report" / "results.csv")
    for heading, key in (("Accuracy", "acc"), ("F1-score", "f1")):
        table = parse_markdown_table(md, heading)
        assert len(table) == 2 and list(table["Loss"]) == ["BCE", "Focal"]
        for (_, t), (_, members) in zip(table.iterrows(), csv.groupby("group", sort=False)):
            for col, prefix in (("Validation", "val"), ("Test", "test")):
                mean, std = (float(x) for x in t[col].split(" ± "))
                values = members[f"{prefix}_{key}"].to_numpy()
                assert mean == pytest.approx(100 * values.mean(), abs=0.006)
                assert std == pytest.approx(100 * values.std(ddof=1), abs=0.006)


@pytest.mark.slow
@needs_cxr_real
def test_real_data_per_source_accuracy(tmp_path: Path) -> None:
    raw = shrink(load_sweep("cxr-real.yaml"), tmp_path, trainer={"epochs": 1, "batch_size": 32, "head_hidden": 16,
                                                                  "weights": "none"})
    raw["grid"].update(backbone=["tiny_cnn"], freeze=["fc_only", "none"], seed=[0])
    for key in ("folds", "group_by"):  # one split: a row per configuration, each tested once
        raw["data"].pop(key, None)
    raw["scheduler"].update(grace_period=1, brackets=1, max_t=None)  # one epoch: no room for the full sweep's hedges
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = Path(raw["output"]) / "report"
    row = json.loads((report / "results.json").read_text())["rows"][0]
    manifest = pd.read_csv(CXR_REAL / "manifest.csv")
    test = manifest[manifest["split"] == "test"]
    by_source = row["test_by_source"]
    assert {s: v["n"] for s, v in by_source.items()} == test["source_dataset"].value_counts().to_dict()
    overall = sum(v["acc"] * v["n"] for v in by_source.values()) / len(test)
    assert overall == pytest.approx(row["eval"]["test"]["acc"])
    md = (report / "REPORT.md").read_text()
    assert "## Test accuracy by source dataset" in md and "nih-chestxray14" in md
    # the paired test against the best, from the per-image outcomes kept in results.json
    data = json.loads((report / "results.json").read_text())
    assert Path(data["data_root"]) == CXR_REAL.resolve()  # what benchmarks/cxr_real.py says it measured on
    a, b = (r["eval"]["test"]["correct"] for r in data["rows"])
    assert len(a) == len(test)
    only_a, only_b = sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    first_is_best = data["best_group"] == data["rows"][0]["group"]
    assert [r["vs_best"]["p"] for r in data["rows"]] == pytest.approx([1.0, p] if first_is_best else [p, 1.0])
    assert list(parse_markdown_table(md, "Accuracy")["vs best: p"]).count("best") == 1
