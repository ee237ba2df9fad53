"""Slim checkpoints: only what training changes is saved; the frozen part is rebuilt on load."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from covid_tune.data.dataset import DatasetIndex, scan_dataset
from covid_tune.data.synthetic import make_synthetic
from covid_tune.engine.checkpoints import FrozenPartMismatch, is_slim
from covid_tune.engine.hparams import HParams
from covid_tune.engine.training import TrainingRun
from covid_tune.models.freeze import trained_state
from covid_tune.models.registry import build_model, load_exported
from covid_tune.results import collect as results
from covid_tune.sweep.trainable import save_checkpoint

CPU = torch.device("cpu")
# block1 frozen: a frozen BatchNorm (must not move) and unfrozen ones (their statistics must be saved);
# dropout and augmentation: the resumed epoch must draw the same random numbers
HP = HParams(backbone="tiny_cnn", freeze="block1", loss="ce", image_size=32, batch_size=8, head_hidden=8,
             dropout=0.3, augment=True, lr=0.05, epochs=3)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> DatasetIndex:
    root = make_synthetic(tmp_path_factory.mktemp("ckpt") / "d", counts={"train": 16, "validation": 8, "test": 8},
                          image_size=36)
    return scan_dataset(root)


def saved(state: dict) -> tuple[dict, int]:
    """``state`` after a trip through torch.save/torch.load, and its size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), size


def full_checkpoint(run: TrainingRun) -> dict:
    """What a checkpoint held before slim checkpoints: the whole model."""
    state = {k: v for k, v in run.state_dict().items() if k not in ("model_part", "frozen_digest")}
    return {**state, "model": run.model.state_dict()}


def frozen_keys(model) -> list[str]:
    return [k for k in model.state_dict() if k not in trained_state(model)]


@pytest.mark.parametrize("backbone", ["tiny_cnn", "resnet18"])
def test_fc_only_checkpoint_is_kilobytes(index: DatasetIndex, backbone: str) -> None:
    hp = replace(HP, backbone=backbone, freeze="fc_only", augment=False, head_hidden=16)
    run = TrainingRun(hp, index, CPU)
    run.run_epoch()  # momentum buffers exist from the first step on
    slim, slim_bytes = saved(run.state_dict())
    _, full_bytes = saved(full_checkpoint(run))
    head = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert is_slim(slim) and set(slim["model"]) == {k for k, p in run.model.named_parameters() if p.requires_grad}
    assert slim_bytes < 2 * 4 * head + 20_000  # weights + momentum in float32, plus a little bookkeeping
    if backbone == "resnet18":
        assert full_bytes > 40e6 and slim_bytes < 100_000


def test_resume_from_slim_checkpoint_equals_resume_from_full(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    run.run_epoch()
    slim, slim_bytes = saved(run.state_dict())
    full, full_bytes = saved(full_checkpoint(run))
    assert slim_bytes < full_bytes and frozen_keys(run.model)
    assert not set(frozen_keys(run.model)) & set(slim["model"])
    assert any("running_mean" in k for k in slim["model"])  # statistics of the unfrozen BatchNorm layers
    expected = run.run_epoch()
    expected_state = {k: v.clone() for k, v in run.model.state_dict().items()}
    expected_opt = run.optimizer.state_dict()["state"]

    for state in (slim, full):
        resumed = TrainingRun(HP, index, CPU)
        resumed.load_state_dict(state)
        assert resumed.epoch == 1
        assert resumed.run_epoch() == expected
        got = resumed.model.state_dict()
        assert all(torch.equal(got[k], expected_state[k]) for k in expected_state)
        for k, s in resumed.optimizer.state_dict()["state"].items():
            assert torch.equal(s["momentum_buffer"], expected_opt[k]["momentum_buffer"])

    # the frozen layers never moved: they are the initial state build_model makes
    initial = build_model(HP, 2).state_dict()
    assert all(torch.equal(expected_state[k], initial[k]) for k in frozen_keys(run.model))
    assert any(not torch.equal(expected_state[k], initial[k]) for k in slim["model"])


def test_slim_checkpoint_refuses_other_initial_weights(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    run.run_epoch()
    slim, _ = saved(run.state_dict())
    with pytest.raises(FrozenPartMismatch, match="seed"):
        TrainingRun(replace(HP, seed=1), index, CPU).load_state_dict(slim)
    with pytest.raises(FrozenPartMismatch, match="freeze level"):
        TrainingRun(replace(HP, freeze="fc_only"), index, CPU).load_state_dict(slim)


def test_export_of_slim_checkpoint_is_a_full_model(index: DatasetIndex, tmp_path: Path) -> None:
    run = TrainingRun(HP, index, CPU)
    row = run.run_epoch()
    folder = tmp_path / "trial" / "checkpoint_000000"
    folder.mkdir(parents=True)
    save_checkpoint(run, row, folder)
    rec = results.TrialRecord("c", tmp_path / "trial", [row], {1: folder})
    target = results.export_best(rec, HP, index.classes, "val_loss", "min", tmp_path / "best")
    exported = torch.load(target / "model.pt", weights_only=True)
    frozen = torch.load(target / "frozen.pt", weights_only=True)  # the frozen layers, stored apart
    assert not exported.keys() & frozen.keys()
    assert exported.keys() | frozen.keys() == run.model.state_dict().keys()  # two plain state_dicts, whole together
    assert exported.keys() == trained_state(run.model).keys()
    stored = json.loads((target / "model.json").read_text())["frozen_weights"]
    assert (tmp_path / "best" / ".frozen" / f"{stored['sha256']}.pt").samefile(target / "frozen.pt")
    model, meta = load_exported(target)
    assert meta["epoch"] == 1
    x = torch.rand(4, 3, 32, 32)
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), run.model(x))
    assert json.loads((target / "model.json").read_text())["source_checkpoint"] == str(folder)


def test_frozen_digest_sums_every_frozen_tensor() -> None:
    """The digest (count, sum |x|, sum x^2) over exactly the frozen part, as one float64 vector would give."""
    from covid_tune.engine.checkpoints import frozen_digest

    model = build_model(HP, 2)
    trained = trained_state(model).keys()
    frozen = torch.cat([v.reshape(-1).double() for k, v in model.state_dict().items() if k not in trained])
    assert 0 < frozen.numel() < sum(v.numel() for v in model.state_dict().values())
    want = [frozen.numel(), float(frozen.abs().sum()), float((frozen * frozen).sum())]
    assert frozen_digest(model) == pytest.approx(want, rel=1e-12)
