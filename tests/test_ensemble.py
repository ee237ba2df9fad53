"""The chosen configuration as one model (results/ensemble.py): members averaged, loaded like a single model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from covid_tune.cli.predict import best_model_dir, load_model
from covid_tune.models.registry import create_model, load_exported, save_exported
from covid_tune.results.ensemble import export_ensemble, members

META = {"backbone": "tiny_cnn", "classes": ["covid", "normal", "pneumonia"], "freeze": "none", "head_hidden": 8,
        "dropout": 0.5, "label_mode": "single", "grayscale": True, "image_size": 32, "threshold": 0.5,
        "metrics": {"val_loss": 0.5}}


def exported_rows(out: Path, n: int = 3) -> list[dict]:
    rows = []
    for i in range(n):
        torch.manual_seed(i)
        model = create_model("tiny_cnn", 3, freeze="none", weights="none", head_hidden=8, dropout=0.5)
        cid = f"g-f{i}-s0"
        save_exported(model.state_dict(), {**META, "config_id": cid, "epoch": i + 1, "fold": i, "seed": 0}, out / cid)
        rows.append({"config_id": cid, "group": "g", "fold": i, "seed": 0, "checkpoint": str(out / cid / "model.pt")})
    return rows


def test_ensemble_probabilities_are_the_mean_of_its_members(tmp_path: Path) -> None:
    rows = exported_rows(tmp_path / "best")
    target = export_ensemble(rows, "g", "auto", tmp_path / "best")
    assert target == tmp_path / "best" / "g" / "ensemble"
    meta = json.loads((target / "model.json").read_text())
    assert [m["config_id"] for m in meta["ensemble"]["members"]] == ["g-f0-s0", "g-f1-s0", "g-f2-s0"]
    x = torch.rand(5, 3, 32, 32)
    ens, _ = load_exported(target)
    single = [load_exported(Path(r["checkpoint"]).parent)[0] for r in rows]
    with torch.no_grad():
        want = np.mean([m(x).softmax(1).numpy() for m in single], axis=0)
        got = ens(x).softmax(1).numpy()
        # predict's loader rebuilds the same module
        again = load_model(target)[0](x).softmax(1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-7)
    # the members' weights are not copied: each member's files are links to its own folder's
    for i, r in enumerate(rows):
        assert (target / "members" / str(i) / "model.pt").samefile(r["checkpoint"])
    assert not (target / "model.pt").exists()
    # the ensemble folder copied alone still loads (the links are files)
    import shutil

    shutil.copytree(target, tmp_path / "copy")
    with torch.no_grad():
        np.testing.assert_allclose(load_model(tmp_path / "copy")[0](x).softmax(1).numpy(), want, rtol=1e-5, atol=1e-7)
    # the same members again: kept; fewer than two members: none
    assert export_ensemble(rows, "g", "auto", tmp_path / "best") == target
    assert export_ensemble(rows[:1], "g", "auto", tmp_path / "best2") is None
    assert export_ensemble(rows, "g", "none", tmp_path / "best3") is None


def test_which_members(tmp_path: Path) -> None:
    rows = [{"config_id": f"g-f{f}-s{s}", "group": "g", "fold": f, "seed": s, "checkpoint": "x"}
            for f in range(2) for s in range(2)]
    assert len(members(rows, "g", "auto")) == 4
    assert [r["config_id"] for r in members(rows, "g", "seeds")] == ["g-f0-s0", "g-f0-s1"]
    assert [r["config_id"] for r in members(rows, "g", "folds")] == ["g-f0-s0", "g-f1-s0"]


def test_predict_takes_the_best_configurations_ensemble(tmp_path: Path, tiny_raw: dict) -> None:
    sweep = tmp_path / "sweep"
    rows = exported_rows(sweep / "best", 2)
    (sweep / "spec.json").write_text(json.dumps(tiny_raw))
    (sweep / "report").mkdir()
    (sweep / "report" / "results.json").write_text(json.dumps({"best_group": "g", "rows": rows}))
    assert best_model_dir(sweep).name == "g-f0-s0"
    export_ensemble(rows, "g", "auto", sweep / "best")
    assert best_model_dir(sweep) == sweep / "best" / "g" / "ensemble"
    assert best_model_dir(sweep, "g-f1-s0").name == "g-f1-s0"


def test_an_ensemble_travels_to_a_worker_whole(tmp_path: Path) -> None:
    """On a cluster an exported folder travels as its files (sweep/evaluation.py): an ensemble's members/
    go with it, and the copy written on the worker loads to the same probabilities."""
    from covid_tune.sweep.evaluation import _evaluate_shipped, folder_files

    rows = exported_rows(tmp_path / "best")
    target = export_ensemble(rows, "g", "auto", tmp_path / "best")
    files = folder_files(target)
    assert {"model.json", "members/0/model.pt", "members/2/model.json"} <= files.keys()
    x = torch.rand(2, 3, 32, 32)

    def evaluate(model_dir, index):
        with torch.no_grad():
            return {"p": load_model(Path(model_dir))[0](x).softmax(1).tolist()}

    with torch.no_grad():
        want = load_model(target)[0](x).softmax(1).numpy()
    np.testing.assert_allclose(_evaluate_shipped(evaluate, files, None)["p"], want, rtol=1e-6)


def test_grad_cam_of_an_ensemble_is_its_members_mean_for_its_prediction(tmp_path: Path, capsys) -> None:
    """predict --cam on an ensemble (the default model of a multi-seed or fold sweep) used to crash: its map
    is the mean of the members' maps, each for the class the ensemble predicts."""
    from conftest import cli_here
    from PIL import Image

    from covid_tune.engine.explain import grad_cam

    rows = exported_rows(tmp_path / "best")
    target = export_ensemble(rows, "g", "auto", tmp_path / "best")
    ens, _ = load_exported(target)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        pred = ens(x).argmax(1).tolist()
    members = [load_exported(Path(r["checkpoint"]).parent)[0] for r in rows]
    want = np.mean([grad_cam(m, "tiny_cnn", x, pred) for m in members], axis=0)
    got = grad_cam(ens, "tiny_cnn", x)
    assert got.shape == (4, 32, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    proc = cli_here(capsys, "predict", target, images, "--cam", tmp_path / "cams")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["0000_0_gradcam.png", "0001_1_gradcam.png"]
