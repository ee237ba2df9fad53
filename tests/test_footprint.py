"""Footprint: a trial keeps its latest checkpoint and the selected epoch's weights, nothing more."""

from __future__ import annotations

import io
import json
from dataclasses import replace
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


def _export(index: DatasetIndex, hp: HParams, cid: str, best: Path) -> Path:
    """Train ``hp`` one epoch and export it as ``best/<cid>`` (a finished trial's one checkpoint)."""
    run = TrainingRun(hp, index, CPU)
    row = {**run.run_epoch(), "val_loss": 0.5}
    folder = best.parent / "ray" / cid / "checkpoint_000000"
    folder.mkdir(parents=True)
    save_checkpoint(run, row, folder)
    rec = results.TrialRecord(cid, folder.parent, [row], {1: folder})
    return results.export_best(rec, hp, index.classes, "val_loss", "min", best)


def test_equal_frozen_layers_are_on_disk_once(index: DatasetIndex, tmp_path: Path) -> None:
    """Two configurations with the same backbone, freeze level and initial weights (another lr) share one
    frozen.pt (one inode, counted once by the console's disk line); another seed's frozen layers are
    other weights, stored apart. Each folder loads on its own, also when copied elsewhere."""
    import shutil

    from covid_tune.cli.console import disk_usage
    from covid_tune.cli.predict import TargetError, load_model

    best = tmp_path / "out" / "best"
    frozen_hp = replace(HP, freeze="fc_only")
    a = _export(index, frozen_hp, "a", best)
    b = _export(index, replace(frozen_hp, lr=0.01), "b", best)
    c = _export(index, replace(frozen_hp, seed=1), "c", best)
    assert (a / "frozen.pt").samefile(b / "frozen.pt") and not (a / "frozen.pt").samefile(c / "frozen.pt")
    assert len(list((best / ".frozen").iterdir())) == 2
    sizes = {p: (p / "model.pt").stat().st_size + (p / "frozen.pt").stat().st_size + (p / "model.json").stat().st_size
             for p in (a, b, c)}
    total, parts = disk_usage(tmp_path / "out")
    assert parts["best"] == sum(sizes.values()) - (a / "frozen.pt").stat().st_size  # b's frozen.pt not counted again

    for folder in (a, b, c):
        model, _ = load_model(folder)
        whole = torch.load(folder / "model.pt", weights_only=True) | torch.load(folder / "frozen.pt", weights_only=True)
        assert all(torch.equal(v, whole[k]) for k, v in model.state_dict().items())
    copy = tmp_path / "elsewhere" / "a"
    shutil.copytree(a, copy)  # a model folder copied alone still loads: its files, not references
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(copy)[0](x), load_model(a)[0](x))
    (copy / "frozen.pt").unlink()
    with pytest.raises(TargetError, match=r"frozen.pt: no such file .*copy the folder whole"):
        load_model(copy)


def test_a_trunk_trained_with_the_head_is_not_split(index: DatasetIndex, tmp_path: Path) -> None:
    """freeze none: every weight trained, model.pt is the whole state_dict and no frozen.pt is written."""
    target = _export(index, HP, "n", tmp_path / "best")
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.pt"]
    assert "frozen_weights" not in json.loads((target / "model.json").read_text())
    model, _ = load_exported(target)
    assert torch.load(target / "model.pt", weights_only=True).keys() == model.state_dict().keys()


def test_the_estimate_of_best_is_what_the_demos_models_take(tmp_path: Path) -> None:
    """The pre-flight's best/ estimate against the demo's eight models written as an export writes them
    (initial weights: same sizes), frozen layers linked where equal: within 2%."""
    from covid_tune.cli.preflight import exported_bytes
    from covid_tune.engine.files import file_bytes_once
    from covid_tune.models.freeze import trained_state
    from covid_tune.models.registry import build_model, save_exported
    from covid_tune.spec import plan as plan_mod
    from covid_tune.spec.load import load_spec

    spec = load_spec(Path(__file__).parent.parent / "sweeps" / "demo.yaml")
    plan = plan_mod.expand(spec)
    for cid, hp in plan.items():
        model = build_model(hp, 2)
        trained = trained_state(model).keys()
        save_exported(model.state_dict(), {"config_id": cid}, tmp_path / "best" / cid,
                      frozen=[k for k in model.state_dict() if k not in trained])
    written = file_bytes_once(p for p in (tmp_path / "best").rglob("*.pt"))
    assert abs(exported_bytes(plan, 2) - written) < 0.02 * written
    assert len(list((tmp_path / "best" / ".frozen").iterdir())) == 2  # resnet18 fc_only and tiny_cnn fc_only
