"""Footprint: a trial keeps its latest checkpoint and the selected epoch's weights, nothing more."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_tune.data.dataset import DatasetIndex, scan_dataset
from covid_tune.data.synthetic import make_synthetic
from covid_tune.engine.checkpoints import RESUME_ONLY, SELECTED_FILE, STATE_FILE, finished_state
from covid_tune.engine.hparams import HParams
from covid_tune.engine.training import TrainingRun
from covid_tune.models.registry import load_exported
from covid_tune.results import collect as results
from covid_tune.results.selection import SELECT_RULES, pick_epoch
from covid_tune.sweep.trainable import Kept, save_checkpoint

CPU = torch.device("cpu")
HP = HParams(backbone="tiny_cnn", freeze="none", loss="ce", image_size=32, batch_size=8, head_hidden=8,
             lr=0.05, epochs=4)


class FakeRun:
    """A run whose weights say which epoch they are from."""

    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"model": {"w": torch.full((2,), float(self.epoch))}, "optimizer": {}, "epoch": self.epoch}


def trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("rule", SELECT_RULES)
@pytest.mark.parametrize("mode", ["min", "max"])
def test_the_final_pick_is_always_the_kept_epoch_or_the_latest(rule: str, mode: str) -> None:
    """Whatever the curve (ties included) and wherever the trial is resumed, the epoch picked over the
    whole history is one whose weights the last checkpoint holds, and they are that epoch's."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        values = np.round(rng.random(int(rng.integers(1, 9))), 1).tolist()  # rounded: ties happen
        resume_at = int(rng.integers(1, len(values) + 1))
        run, kept = FakeRun(), Kept("val_loss", mode, rule)
        for epoch, value in enumerate(values, 1):
            run.epoch = epoch
            kept.update(run, {"epoch": epoch, "val_loss": value})
            if epoch == resume_at:  # a new process, from this epoch's checkpoint
                record, selected = trip(kept.record()), trip(kept.selected_file(epoch))
                kept = Kept("val_loss", mode, rule)
                kept.restore(run, record, selected)
        history = [{"epoch": e, "val_loss": v} for e, v in enumerate(values, 1)]
        want = pick_epoch(history, "val_loss", mode, rule)
        held = {len(values)} | ({kept.epoch} if kept.epoch is not None else set())
        assert pick_epoch(history, "val_loss", mode, rule, held) == want, (values, rule, mode, resume_at)
        if want != len(values):
            assert kept.epoch == want and float(kept.selected_file(len(values))["model"]["w"][0]) == want
        else:
            assert kept.selected_file(len(values)) is None or kept.epoch != want


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> DatasetIndex:
    root = make_synthetic(tmp_path_factory.mktemp("fp") / "d", counts={"train": 16, "validation": 8, "test": 8},
                          image_size=36)
    return scan_dataset(root)


def test_one_folder_holds_the_latest_state_and_the_selected_weights(index: DatasetIndex, tmp_path: Path) -> None:
    """Only the latest checkpoint folder is left; the report finds the selected epoch in it, exports
    exactly that epoch's model, and a finished trial's state keeps no optimizer state."""
    run = TrainingRun(HP, index, CPU)
    # a curve whose best epoch is the 2nd: the metric is made up, the weights are real
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.6}
    kept, models, history = Kept("val_loss", "min", "best"), {}, []
    folder = tmp_path / "trial" / "checkpoint_000003"
    folder.mkdir(parents=True)
    for epoch in range(1, 5):
        row = {**run.run_epoch(), "val_loss": losses[epoch]}
        kept.update(run, row)
        history.append(row)
        models[epoch] = {k: v.clone() for k, v in run.model.state_dict().items()}
    save_checkpoint(run, row, folder, kept)
    rec = results.read_trial("c", tmp_path / "trial")
    rec.history = history
    assert sorted(rec.weights) == [2, 4] and rec.weights[2] == folder / SELECTED_FILE
    selected = torch.load(folder / SELECTED_FILE, weights_only=True)
    assert not set(RESUME_ONLY) & set(selected)  # the selected weights carry no optimizer state
    target = results.export_best(rec, HP, index.classes, "val_loss", "min", tmp_path / "best")
    model, meta = load_exported(target)
    assert meta["epoch"] == 2
    assert all(torch.equal(v, models[2][k]) for k, v in model.state_dict().items())

    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert "optimizer" in state and state["selection"]["epoch"] == 2
    done = finished_state(state)
    assert not set(RESUME_ONLY) & set(done) and done["finished"]
    small, full = io.BytesIO(), io.BytesIO()
    torch.save(done, small)
    torch.save(state, full)
    assert small.tell() < full.tell()


def test_a_finished_trial_gives_its_weights_up_once_best_holds_them(index: DatasetIndex, tmp_path: Path) -> None:
    """After export, a finished trial's folder keeps its epochs (state.pt, selected.pt, metrics) but no
    weights: best/ holds the chosen epoch's once. The report picks the same epoch again and reads best/;
    without best/ it says where the weights went."""
    from covid_tune.engine.checkpoints import EXPORTED_KEY, MODEL_KEYS

    run = TrainingRun(HP, index, CPU)
    losses = {1: 0.9, 2: 0.2, 3: 0.5}
    kept, history = Kept("val_loss", "min", "best"), []
    folder = tmp_path / "trial" / "checkpoint_000002"
    folder.mkdir(parents=True)
    for epoch in range(1, 4):
        row = {**run.run_epoch(), "val_loss": losses[epoch]}
        kept.update(run, row)
        history.append(row)
    save_checkpoint(run, row, folder, kept)
    torch.save(finished_state(torch.load(folder / STATE_FILE, weights_only=True)), folder / STATE_FILE)
    rec = results.read_trial("c", tmp_path / "trial")
    rec.history = history
    target = results.export_best(rec, HP, index.classes, "val_loss", "min", tmp_path / "best")
    exported = (target / "model.pt").read_bytes()
    before = sum(p.stat().st_size for p in folder.glob("*.pt"))
    freed = results.release_exported(rec, target)
    after = sum(p.stat().st_size for p in folder.glob("*.pt"))
    assert freed == before - after and after < 20_000 < before
    for name, epoch in ((STATE_FILE, 3), (SELECTED_FILE, 2)):
        state = torch.load(folder / name, weights_only=True)
        assert state[EXPORTED_KEY] and state["epoch"] == epoch and not set(MODEL_KEYS) & set(state), name
    assert results.release_exported(rec, target) == 0  # done once

    again = results.read_trial("c", tmp_path / "trial")
    again.history = history
    assert sorted(again.weights) == [2, 3] and results.best_epoch(again, "val_loss", "min") == 2
    assert results.export_best(again, HP, index.classes, "val_loss", "min", tmp_path / "best") == target
    assert (target / "model.pt").read_bytes() == exported
    (target / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="weights of epoch 2 are kept in .*model.pt only"):
        results.export_best(again, HP, index.classes, "val_loss", "min", tmp_path / "best")


def test_an_unfinished_trial_keeps_its_weights(index: DatasetIndex, tmp_path: Path) -> None:
    """A trial that may still resume (its optimizer state kept) is never released."""
    run = TrainingRun(HP, index, CPU)
    folder = tmp_path / "trial" / "checkpoint_000000"
    folder.mkdir(parents=True)
    row = {**run.run_epoch(), "val_loss": 0.5}
    kept = Kept("val_loss", "min", "best")
    kept.update(run, row)
    save_checkpoint(run, row, folder, kept)
    rec = results.read_trial("c", tmp_path / "trial")
    rec.history = [row]
    target = results.export_best(rec, HP, index.classes, "val_loss", "min", tmp_path / "best")
    assert results.release_exported(rec, target) == 0
    assert "model" in torch.load(folder / STATE_FILE, weights_only=True)
