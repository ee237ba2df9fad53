"""End to end through Ray: the demo sweep, shrunk, from YAML to REPORT.md, and back again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, cli_here, load_sweep, parse_markdown_table, shrink
from PIL import Image
from torchvision import transforms as T

from covid_tune.models.registry import load_exported

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tune", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo spec with tiny sizes, run once through Ray for every test of this module."""
    tmp = tmp_path_factory.mktemp("demo")
    raw = shrink(load_sweep("demo.yaml"), tmp, trainer={"epochs": 4, "batch_size": 16, "head_hidden": 16,
                                                          "weights": "none"})
    raw["data"]["synthetic"].update(train=40, validation=16, test=16)
    spec_path = tmp / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(spec_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(raw["output"])


def test_report_tables_match_results_csv(demo_run: Path) -> None:
    md = (demo_run / "report" / "REPORT.md").read_text()
    csv = pd.read_csv(demo_run / "report" / "results.csv")
    assert len(csv) == 8 and csv["config_id"].is_unique
    for heading, key in (("Accuracy", "acc"), ("F1-score", "f1")):
        table = parse_markdown_table(md, heading)
        assert list(table.columns[:3]) == ["Sr #", "Backbone", "Layers"]
        # the Accuracy table also compares each row with the best (McNemar and DeLong on the test images)
        tail = ["Epochs", "Train", "Validation", "Test"] + (["vs best: p", "vs best: AUC p"] if key == "acc" else [])
        assert list(table.columns[-len(tail):]) == tail
        assert len(table) == len(csv)
        for (_, t), (_, c) in zip(table.iterrows(), csv.iterrows()):
            assert t["Backbone"] == c["backbone"] and t["Layers"] == c["layers"]
            assert t["Epochs"] == f"{c['epochs_trained']}{'*' if c['stopped_early'] else ''}"
            for col, prefix in (("Train", "train"), ("Validation", "val"), ("Test", "test")):
                assert float(t[col]) == pytest.approx(100 * c[f"{prefix}_{key}"], abs=0.006)


def test_training_paths_are_reported(demo_run: Path) -> None:
    """The demo (no augmentation, decoded cache on) trains fc_only on cached features, `none` on images."""
    csv = pd.read_csv(demo_run / "report" / "results.csv")
    assert (csv["decoded_cache"] == 1).all() and (csv["augmented"] == 0).all() and (csv["gpu"] == 0).all()
    assert (csv["feature_cache"] == (csv["freeze"] != "none").astype(int)).all()
    assert (csv["compiled"] == 0).all()  # compile: auto is off on a CPU
    md = (demo_run / "report" / "REPORT.md").read_text()
    n = len(csv)
    assert (f"decoded-image cache {n}/{n}, feature cache (frozen prefix run once) "
            f"{int(csv['feature_cache'].sum())}/{n}, augmented training images 0/{n}, GPU 0/{n}, "
            f"torch.compile 0/{n}.") in md


def test_every_configuration_has_a_loadable_best_checkpoint(demo_run: Path) -> None:
    csv = pd.read_csv(demo_run / "report" / "results.csv")
    assert (csv["status"] == "ok").all()
    assert (csv["epochs_trained"] <= 4).all() and (csv["epochs_trained"] >= 1).all()
    assert (csv["best_epoch"] <= csv["epochs_trained"]).all()
    # ASHA really ran: some trials stopped before the maximum, and they are the ones flagged
    assert csv["stopped_early"].any() and not csv["stopped_early"].all()
    assert (csv.loc[csv["stopped_early"], "epochs_trained"] < 4).all()
    assert (csv.loc[~csv["stopped_early"], "epochs_trained"] == 4).all()
    for path in csv["checkpoint"]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_best_checkpoint_reproduces_recorded_validation_accuracy(demo_run: Path) -> None:
    csv = pd.read_csv(demo_run / "report" / "results.csv")
    row = csv.sort_values("val_acc").iloc[-1]
    model_dir = Path(row["checkpoint"]).parent
    meta = json.loads((model_dir / "model.json").read_text())
    model, _ = load_exported(model_dir)
    # preprocessing rebuilt from model.json alone
    size = meta["image_size"]
    tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(meta["normalization"]["mean"], meta["normalization"]["std"])])
    root = demo_run / "synthetic-data" / "validation"
    correct = total = 0
    with torch.no_grad():
        for label, cls in enumerate(meta["classes"]):
            for f in sorted((root / cls).glob("*.png")):
                x = tf(Image.open(f).convert("L").convert("RGB")).unsqueeze(0)
                correct += int(model(x).argmax(1).item() == label)
                total += 1
    assert correct / total == pytest.approx(meta["metrics"]["val_acc"], abs=1e-9)
    assert correct / total == pytest.approx(row["val_acc"], abs=1e-9)
    assert meta["epoch"] == row["best_epoch"]


def test_history_and_figures(demo_run: Path) -> None:
    data = json.loads((demo_run / "report" / "results.json").read_text())
    for row in data["rows"]:
        epochs = [h["epoch"] for h in row["history"]]
        assert epochs == list(range(1, row["epochs_trained"] + 1))
        best = min(row["history"], key=lambda h: (h["val_loss"], h["epoch"]))  # metric val_loss, mode min
        assert row["best_epoch"] == best["epoch"]
        for kind in ("loss", "acc", "confusion"):
            png = demo_run / "report" / "figures" / f"{row['config_id']}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert Image.open(png).size[0] > 100


def test_phase_times_and_evaluations_started_as_trials_ended(demo_run: Path, tmp_path: Path) -> None:
    from covid_tune.data.dataset import scan_dataset
    from covid_tune.results.collect import evaluate_export

    data = json.loads((demo_run / "report" / "results.json").read_text())
    timing = data["timing"]
    phases = timing["phases_s"]
    assert list(phases) == ["startup", "cache", "ray_start", "trials", "evaluation", "report"]
    assert all(v >= 0 for v in phases.values()) and phases["trials"] > 0
    assert sum(phases.values()) <= timing["wall_s"] + 0.1
    assert timing["outside_trials"] == pytest.approx(1 - phases["trials"] / timing["wall_s"], abs=1e-3)
    assert timing["evaluated_during_trials"] == len(data["rows"])  # each one started as its trial ended
    # the evaluator actor (test split decoded once, in memory) agrees with evaluating from the files
    index = scan_dataset(demo_run / "synthetic-data")
    for row in data["rows"][:2]:
        copy = tmp_path / row["config_id"]
        copy.mkdir()
        for name in ("model.pt", "frozen.pt", "model.json"):  # frozen.pt: where the freeze level has frozen layers
            if (Path(row["checkpoint"]).parent / name).is_file():
                (copy / name).write_bytes((Path(row["checkpoint"]).parent / name).read_bytes())
        fresh = evaluate_export(copy, index)["splits"]
        for split in ("train", "validation", "test"):
            assert fresh[split]["confusion"] == row["eval"][split]["confusion"]
            assert fresh[split]["loss"] == pytest.approx(row["eval"][split]["loss"], rel=1e-5)


def test_predict_reproduces_the_sweeps_test_predictions(demo_run: Path, tmp_path: Path, capsys) -> None:
    """The test evaluation ran as Ray tasks; predict (no Ray) gives the same labels and probabilities."""
    out_csv = tmp_path / "pred.csv"
    proc = cli_here(capsys, "predict", str(demo_run), str(demo_run / "synthetic-data" / "test"), "--csv", str(out_csv))
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = proc.stderr.split("[covid_tune] model ", 1)[1].split()[0]
    metas = {d.name: json.loads((d / "model.json").read_text()) for d in (demo_run / "best").iterdir()
             if (d / "model.json").is_file()}
    assert metas[chosen]["metrics"]["val_loss"] == min(m["metrics"]["val_loss"] for m in metas.values())
    test = json.loads((demo_run / "best" / chosen / "eval.json").read_text())["splits"]["test"]
    pred = pd.read_csv(out_csv).set_index("path").loc[test["files"]]
    classes, meta = metas[chosen]["classes"], metas[chosen]
    # predict prints the temperature-scaled probabilities (fitted on validation) and decides at the
    # operating point, both stored in model.json
    from covid_tune.results.clinical import calibrated

    scaled = calibrated(np.asarray(test["logits"]), "single", meta["temperature"])
    np.testing.assert_allclose(pred[classes].to_numpy(), scaled, atol=1e-5)
    assert np.array_equal(scaled.argmax(1), np.argmax(test["probs"], 1))  # scaling keeps the argmax
    k = classes.index(meta["operating_point"]["positive"])
    assert list(pred["predicted"]) == [classes[k] if p[k] >= meta["operating_point"]["threshold"]
                                       else classes[1 - k] for p in scaled]
    md = (demo_run / "report" / "REPORT.md").read_text()
    assert "## Shortcut check: is the model reading the lungs?" in md and "## Grad-CAM: where each best" in md
    assert len(list((demo_run / "report" / "figures").glob("*_gradcam.png"))) == len(metas)


def test_report_rebuilds_from_output_folder(demo_run: Path, capsys) -> None:
    before = pd.read_csv(demo_run / "report" / "results.csv")
    (demo_run / "report" / "REPORT.md").unlink()
    proc = cli_here(capsys, "report", str(demo_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = pd.read_csv(demo_run / "report" / "results.csv")
    pd.testing.assert_frame_equal(before, after)
    assert (demo_run / "report" / "REPORT.md").is_file()


def test_rerun_without_resume_refuses_to_overwrite(demo_run: Path, capsys, monkeypatch) -> None:
    spec = demo_run.parent / "demo.yaml"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # refused before Ray starts, but would join one named here
    proc = cli_here(capsys, "run", str(spec))
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
