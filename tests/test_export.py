"""covid-tune export: ONNX and TorchScript files that give the PyTorch model's probabilities."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_tune.cli import export as export_mod
from covid_tune.cli.main import main as cli_main
from covid_tune.cli.predict import load_batch, load_model
from covid_tune.data.dataset import scan_dataset
from covid_tune.data.synthetic import make_synthetic
from covid_tune.engine.hparams import HParams
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, save_exported

CLASSES = ["infected", "normal"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An exported tiny_cnn model folder (as results.export_best writes it, no Ray) whose eval.json names
    synthetic test images, like a sweep's best/<id>/."""
    tmp = tmp_path_factory.mktemp("export")
    root = make_synthetic(tmp / "data", counts={"train": 4, "validation": 4, "test": 6}, image_size=40)
    hp = HParams(backbone="tiny_cnn", freeze="none", loss="ce", head_hidden=8, image_size=32)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 2, head_hidden=8, dropout=0.3)
    with torch.no_grad():  # a model whose probabilities are far from 1/2: differences would show
        for p in model.parameters():
            p.mul_(4)
    meta = {**asdict(hp), "dropout": 0.3, "config_id": "tiny_cnn-none-ce-s0", "classes": CLASSES, "epoch": 3,
            "metrics": {}, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "temperature": 1.5}
    folder = tmp / "model"
    save_exported(model.state_dict(), meta, folder)
    test_files = [str(p) for p in scan_dataset(root).paths("test")]
    (folder / "eval.json").write_text(json.dumps({"splits": {"test": {"files": test_files}}}))
    return folder


def torch_probabilities(model_dir: Path) -> tuple[np.ndarray, torch.Tensor]:
    """The PyTorch model's probabilities on the eval.json test images, and those images preprocessed."""
    model, meta = load_model(model_dir)
    files = [Path(f) for f in json.loads((model_dir / "eval.json").read_text())["splits"]["test"]["files"]]
    _, tensors, _ = load_batch(files, meta)
    images = torch.stack(tensors)
    with torch.no_grad():
        return torch.softmax(model(images), 1).numpy(), images


def check_sidecar(info: dict, fmt: str) -> None:
    assert info["format"] == fmt and info["classes"] == CLASSES and info["input"]["shape"] == ["batch", 3, 32, 32]
    pre = info["preprocessing"]
    assert (pre["resize"], pre["center_crop"], pre["grayscale"]) == (37, 32, True)  # round(32 * 256 / 224)
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert info["temperature"] == 1.5 and info["threshold"] == 0.5 and info["label_mode"] == "single"
    assert info["parity"]["images"] == "8 test images from eval.json" and info["parity"]["max_abs_diff"] <= 1e-4


def test_torchscript_export_reproduces_the_probabilities(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ts"
    assert cli_main(["export", str(model_dir), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity on 8 test images from eval.json: max |p - p_torch| = " in printed
    info = json.loads((out / "model.torchscript.pt.json").read_text())
    check_sidecar(info, "torchscript")
    want, images = torch_probabilities(model_dir)
    assert want.max() > 0.9  # far from 1/2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(out / "model.torchscript.pt"))
    with torch.no_grad():
        got = loaded(images).numpy()
    assert np.abs(got - want).max() <= 1e-4
    with torch.no_grad():  # another batch size than the trace's
        assert np.abs(loaded(images[:1]).numpy() - want[:1]).max() <= 1e-4


def test_onnx_export_reproduces_the_probabilities(model_dir: Path, tmp_path: Path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    assert cli_main(["export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    info = json.loads((out / "model.onnx.json").read_text())
    check_sidecar(info, "onnx")
    assert info["opset"] == export_mod.OPSET
    want, images = torch_probabilities(model_dir)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):  # the batch dimension is dynamic
        got = session.run(None, {"image": batch.numpy()})[0]
        assert np.abs(got - want[:len(batch)]).max() <= 1e-4


def test_missing_extra_is_one_message_and_exit_2(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = export_mod.importlib.util.find_spec
    monkeypatch.setattr(export_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli_main(["export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'covid_tune[export]'" in err and "missing: onnxruntime" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_target_is_exit_2(tmp_path: Path, capsys) -> None:
    assert cli_main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert "neither a sweep output folder" in err and "Traceback" not in err
