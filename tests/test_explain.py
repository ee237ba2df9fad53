"""Shortcut check, Grad-CAM and predict: masks, the flag rule, maps, and a finished sweep read back."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import load_sweep, parse_markdown_table, shrink, write_image
from explain_helpers import fake_sweep, make_corner_marker_data
from scipy.stats import binomtest

from covid_tune.cli import predict as predict_mod
from covid_tune.engine import explain
from covid_tune.engine.hparams import HParams
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, save_exported
from covid_tune.results import clinical

CLASSES = ["infected", "normal"]
SHORTCUT = "Shortcut check: is the model reading the lungs?"


def shortcut_table(md: str):
    """The shortcut check's table (it follows a paragraph, so start the parse at its first row)."""
    section = md.split(f"## {SHORTCUT}\n", 1)[1]
    return parse_markdown_table("## T\n" + section[section.index("\n|") + 1:], "T")


def test_masks_fill_the_box_or_the_border_with_the_image_mean() -> None:
    images = torch.randn(3, 3, 20, 10)
    y0, y1, x0, x1 = explain.centre_box(20, 10, 0.6, 0.7)
    assert (y0, y1, x0, x1) == (3, 17, 2, 8)
    mean = images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    hidden, kept = explain.masked(images, 0.6, 0.7, False), explain.masked(images, 0.6, 0.7, True)
    inside = torch.zeros(20, 10, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(hidden[..., inside], mean[..., inside])
    assert torch.equal(hidden[..., ~inside], images[..., ~inside])
    assert torch.equal(kept[..., ~inside], mean[..., ~inside]) and torch.equal(kept[..., inside], images[..., inside])


def test_flag_rule_is_the_clopper_pearson_bound_above_majority_plus_margin() -> None:
    for k, n in ((40, 40), (31, 40), (25, 40), (120, 200)):
        low = binomtest(k, n).proportion_ci(0.95, method="exact").low
        assert explain.accuracy_low(k, n) == pytest.approx(low)
        assert explain.shortcut_flag(k, n, 0.5, 0.1) == (low > 0.6)
    assert explain.shortcut_flag(40, 40, 0.5, 0.1) and not explain.shortcut_flag(25, 40, 0.5, 0.1)
    assert explain.majority_rate(np.array([0, 0, 1, 2])) == 0.5
    assert explain.majority_rate(np.array([[1, 0], [1, 0], [0, 1]])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("backbone,freeze", [("tiny_cnn", "fc_only"), ("tiny_cnn", "none")])
def test_grad_cam_maps_have_the_input_size_and_are_not_constant(backbone: str, freeze: str) -> None:
    torch.manual_seed(0)
    model = create_model(backbone, 2, freeze=freeze, head_hidden=8).eval()
    images = torch.randn(3, 3, 40, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = explain.grad_cam(model, backbone, images)
    assert maps.shape == (3, 40, 40) and np.isfinite(maps).all()
    assert all(m.max() - m.min() > 0.1 for m in maps)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing moved
    share = explain.mass_inside(maps, 0.6, 0.7)
    inside = explain.box_mask(40, 40, 0.6, 0.7)
    assert share[0] == pytest.approx(maps[0][inside].sum() / maps[0].sum(), rel=1e-5)


def test_report_spec_section_is_validated() -> None:
    from covid_tune.spec.load import SpecError, validate

    base = {"name": "x", "data": {"synthetic": {}}, "grid": {"backbone": ["tiny_cnn"]}}
    spec = validate(base)
    assert spec.report.shortcut_check.enabled and spec.report.shortcut_check.box_width == 0.6
    assert spec.report.shortcut_check.box_height == 0.7 and spec.report.gradcam.per_class == 4
    assert not validate({**base, "report": {"shortcut_check": False}}).report.shortcut_check.enabled
    with pytest.raises(SpecError) as err:
        validate({**base, "report": {"shortcut_check": {"box": 0.5, "box_width": 1.2}, "saliency": 1}})
    msg = str(err.value)
    assert "report.shortcut_check.box: unknown key (allowed: enabled, box_width, box_height, margin)" in msg
    assert "report.shortcut_check.box_width: Input should be less than 1" in msg
    assert ("report.saliency: unknown key (allowed: shortcut_check, gradcam, positive, operating_point, ensemble, "
            "top_k)") in msg


def test_label_names() -> None:
    assert explain.label_names(1, CLASSES) == "normal"
    assert explain.label_names(np.array([1, 1]), CLASSES) == "infected+normal"
    assert explain.label_names([0, 0], CLASSES) == "none"


def test_cam_sample_is_seeded_and_per_class() -> None:
    labels = np.array([0] * 10 + [1] * 3)
    a, b = explain.cam_sample(labels, 2, 4, seed=1), explain.cam_sample(labels, 2, 4, seed=1)
    assert a == b and len(a) == 7 and sum(labels[a] == 0) == 4 and sum(labels[a] == 1) == 3


# --- exported model without training: predict's command line ------------------------------

def export_untrained(folder: Path, image_size: int = 32) -> Path:
    """An exported model folder as results.export_best writes it, from an untrained tiny_cnn."""
    hp = HParams(backbone="tiny_cnn", freeze="none", loss="ce", head_hidden=8, image_size=image_size)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 2, head_hidden=8)
    meta = {**asdict(hp), "config_id": "tiny_cnn-none-ce-s0", "classes": CLASSES, "epoch": 1, "metrics": {},
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    save_exported(model.state_dict(), meta, folder)
    return folder


def test_predict_reports_bad_files_by_name_and_exits_1(tmp_path: Path, capsys) -> None:
    model = export_untrained(tmp_path / "model")
    good = write_image(tmp_path / "imgs" / "a.png", "RGB", size=40)
    write_image(tmp_path / "imgs" / "sub" / "b.png", "L", size=40)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"\0")  # hidden files in folders are ignored
    out_csv = tmp_path / "p.csv"
    rc = predict_mod.main([str(model), str(tmp_path / "imgs"), str(tmp_path / "missing.png"), "--csv", str(out_csv),
                           "--cam", str(tmp_path / "cams")])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(good), str(tmp_path / "imgs" / "sub" / "b.png")]
    for ln in lines:
        _, label, *probs = ln.split("\t")
        assert label in CLASSES and [p.split("=")[0] for p in probs] == CLASSES
        assert sum(float(p.split("=")[1]) for p in probs) == pytest.approx(1, abs=1e-3)
    assert "notes.txt: skipped, not an image file" in err and "broken.png: skipped, cannot be read" in err
    assert "missing.png: no such file or folder" in err and ".DS_Store" not in err
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["path"] for r in rows] == [str(good), str(tmp_path / "imgs" / "sub" / "b.png")]
    assert len(sorted((tmp_path / "cams").glob("*_gradcam.png"))) == 2


def test_predict_exits_2_for_a_target_that_is_no_sweep_or_model(tmp_path: Path, capsys) -> None:
    img = write_image(tmp_path / "a.png")
    assert predict_mod.main([str(tmp_path), str(img)]) == 2
    assert "neither a sweep output folder" in capsys.readouterr().err
    model = export_untrained(tmp_path / "model")
    assert predict_mod.main([str(model), str(img), "--config", "other"]) == 2


def test_predict_uses_the_reports_best_configuration(tiny_raw: dict, tmp_path: Path) -> None:
    """The report chooses a configuration by its mean over seeds; predict takes that one's best seed, not
    the single best model of the sweep (another configuration's lucky seed)."""
    sweep = tmp_path / "sweep"
    tiny_raw["grid"]["seed"] = [0, 1]
    (sweep / "report").mkdir(parents=True)
    (sweep / "spec.json").write_text(json.dumps(tiny_raw))
    val_loss = {"tiny_cnn-fc_only-ce-s0": 0.1, "tiny_cnn-fc_only-ce-s1": 0.9,  # mean 0.5, best single model
                "tiny_cnn-none-ce-s0": 0.35, "tiny_cnn-none-ce-s1": 0.3}      # mean 0.325: the report's best
    for cid, loss in val_loss.items():
        (sweep / "best" / cid).mkdir(parents=True)
        (sweep / "best" / cid / "model.json").write_text(json.dumps({"metrics": {"val_loss": loss}}))
    assert predict_mod.best_model_dir(sweep).name == "tiny_cnn-fc_only-ce-s0"  # no report yet: the best model
    rows = [{"config_id": cid, "group": cid.rsplit("-", 1)[0]} for cid in val_loss]
    (sweep / "report" / "results.json").write_text(json.dumps({"best_group": "tiny_cnn-none-ce", "rows": rows}))
    assert predict_mod.best_model_dir(sweep).name == "tiny_cnn-none-ce-s1"
    assert predict_mod.best_model_dir(sweep, "tiny_cnn-fc_only-ce-s1").name == "tiny_cnn-fc_only-ce-s1"


def test_exported_state_dict_loads_into_plain_torchvision(tmp_path: Path) -> None:
    """docs/outputs.md's recipe: strip ``net.``, give torchvision's model the same head."""
    torch.manual_seed(0)
    ours = create_model("resnet18", 2, head_hidden=16, dropout=0.2).eval()
    torch.save(ours.state_dict(), tmp_path / "model.pt")
    # --- docs/outputs.md recipe ---
    state = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in state.items()}
    net = torchvision.models.resnet18(num_classes=2)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                 torch.nn.Linear(16, 2))
    net.load_state_dict(state)
    # ---
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ours(x), atol=1e-6)


# --- finished sweeps (trained here, without Ray) ------------------------------------------

TRAIN = {"optimizer": "adam", "lr": 0.003, "epochs": 8, "head_hidden": 0}
COUNTS = {"train": 32, "validation": 12, "test": 20}


@pytest.fixture(scope="module")
def centre_sweep(tmp_path_factory) -> Path:
    """The demo's data (signal in the lungs) and its report settings, one tiny_cnn configuration."""
    tmp = tmp_path_factory.mktemp("centre")
    demo = load_sweep("demo.yaml")
    raw = shrink({"name": "centre", "data": {"synthetic": {"classes": CLASSES, **COUNTS, "image_size": 36}},
                  "grid": {"backbone": ["tiny_cnn"], "freeze": ["none", "fc_only"], "loss": ["ce"]},
                  "scheduler": {"metric": "val_loss"}, "report": demo["report"]}, tmp, trainer=TRAIN)
    return fake_sweep(raw)


@pytest.mark.slow
def test_predict_reproduces_the_test_predictions_stored_by_the_sweep(centre_sweep: Path, tmp_path: Path) -> None:
    test_dir = centre_sweep / "synthetic-data" / "test"
    for cid in ("tiny_cnn-none-ce-s0", "tiny_cnn-fc_only-ce-s0"):
        ev = json.loads((centre_sweep / "best" / cid / "eval.json").read_text())["splits"]["test"]
        rc = predict_mod.main([str(centre_sweep), str(test_dir), "--config", cid, "--csv", str(tmp_path / "p.csv")])
        assert rc == 0
        rows = {r["path"]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
        assert sorted(rows) == sorted(ev["files"])
        probs = np.array([[float(rows[f][c]) for c in CLASSES] for f in ev["files"]])
        # predict prints the temperature-scaled probabilities and decides at the operating point (model.json)
        meta = json.loads((centre_sweep / "best" / cid / "model.json").read_text())
        scaled = clinical.calibrated(np.asarray(ev["logits"]), "single", meta["temperature"])
        np.testing.assert_allclose(probs, scaled, atol=1e-5)
        assert np.array_equal(np.array(ev["probs"]).argmax(1), scaled.argmax(1))
        op = meta["operating_point"]
        k = CLASSES.index(op["positive"])
        labels = [rows[f]["predicted"] for f in ev["files"]]
        assert labels == [CLASSES[k] if p[k] >= op["threshold"] else CLASSES[1 - k] for p in scaled]
    # without --config: the configuration whose best epoch has the lowest val_loss (the sweep's metric)
    metas = {d.name: json.loads((d / "model.json").read_text()) for d in (centre_sweep / "best").iterdir()
             if (d / "model.json").is_file()}
    best = min(metas, key=lambda c: metas[c]["metrics"]["val_loss"])
    assert predict_mod.resolve_target(centre_sweep, None).name == best


@pytest.mark.slow
def test_centre_signal_data_is_not_flagged(centre_sweep: Path) -> None:
    md = (centre_sweep / "report" / "REPORT.md").read_text()
    table = shortcut_table(md)
    row = table[table["config_id"] == "tiny_cnn-none-ce-s0"].iloc[0]
    assert float(row["As is"]) >= 80  # it learned, so "not flagged" means something
    assert row["Flagged"] == "no" and float(row["Lungs hidden"]) <= 65
    assert "Grad-CAM: where each best checkpoint looks" in md
    assert (centre_sweep / "report" / "figures" / "tiny_cnn-none-ce-s0_gradcam.png").is_file()
    cam = json.loads((centre_sweep / "best" / "tiny_cnn-none-ce-s0" / "eval.json").read_text())["cam"]
    assert len(cam["paths"]) == 8 and sorted(cam["labels"]) == [0] * 4 + [1] * 4


@pytest.mark.slow
def test_grad_cam_of_a_trained_model_in_predict(centre_sweep: Path) -> None:
    from covid_tune.models.registry import load_exported

    model, meta = load_exported(centre_sweep / "best" / "tiny_cnn-fc_only-ce-s0")
    files = sorted((centre_sweep / "synthetic-data" / "test").rglob("*.png"))[::5]
    _, tensors, problems = predict_mod.load_batch(files, meta)
    maps = explain.grad_cam(model, "tiny_cnn", torch.stack(tensors))
    assert not problems and maps.shape == (len(files), 32, 32)
    assert all(m.max() - m.min() > 0.5 for m in maps)


@pytest.mark.slow
def test_corner_marker_data_is_flagged(tmp_path: Path) -> None:
    root = make_corner_marker_data(tmp_path / "data", COUNTS)
    raw = shrink({"name": "corner", "data": {"root": str(root)},
                  "grid": {"backbone": ["tiny_cnn"], "freeze": ["none"], "loss": ["ce"]},
                  "scheduler": {"metric": "val_loss"}, "report": load_sweep("demo.yaml")["report"],
                  }, tmp_path, trainer=TRAIN)
    out = fake_sweep(raw)
    md = (out / "report" / "REPORT.md").read_text()
    row = shortcut_table(md).iloc[0]
    assert row["Flagged"] == "**yes**" and float(row["Lungs hidden"]) >= 90
    assert float(row["Lungs only"]) <= 60  # the lungs alone carry nothing
    assert "**Shortcut warning**" in md
