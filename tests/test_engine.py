"""The training engine without Ray: epochs, checkpoint state, multi-label runs, evaluation."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from engine_helpers import CPU, TINY_HP

from covid_tune.data.dataset import DatasetIndex, scan_dataset
from covid_tune.data.synthetic import make_synthetic
from covid_tune.engine.metrics import multi_label_metrics, single_label_metrics
from covid_tune.engine.training import TrainingRun, evaluate, predict

COUNTS = {"train": 16, "validation": 8, "test": 8}
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1"}
HP = TINY_HP
HP_MULTI = replace(HP, label_mode="multi", loss="bce", implies={"covid": ["pneumonia"]})


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> DatasetIndex:
    root = make_synthetic(tmp_path_factory.mktemp("engine") / "d", counts=COUNTS, image_size=36)
    return scan_dataset(root)


@pytest.fixture(scope="module")
def index3(tmp_path_factory) -> DatasetIndex:
    root = make_synthetic(tmp_path_factory.mktemp("engine3") / "d", classes=("covid", "normal", "pneumonia"),
                          counts=COUNTS, image_size=36)
    return scan_dataset(root)


def params(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def in_unit_interval(metrics: dict) -> None:
    for k, v in metrics.items():
        if k.endswith(("_acc", "_f1")):
            assert 0.0 <= v <= 1.0, (k, v)
        if k.endswith("_loss"):
            assert math.isfinite(v) and v > 0, (k, v)


def test_run_epoch_returns_metrics_and_counts_epochs(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    assert run.epoch == 0 and run.classes == ["infected", "normal"]
    assert len(run.train_loader.dataset) == 32 and len(run.val_loader.dataset) == 16
    before = params(run)
    first = run.run_epoch()
    assert set(first) == EPOCH_KEYS
    assert first["epoch"] == 1 and run.epoch == 1
    in_unit_interval(first)
    assert not same_state(before, params(run))  # it trained
    second = run.run_epoch()
    assert second["epoch"] == 2 and run.epoch == 2
    assert second != first


def test_val_metrics_are_those_of_evaluate(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    out = run.run_epoch()
    res = evaluate(run.model, run.val_loader, run.loss_fn, CPU, "single", 0.5, 2)
    assert out["val_loss"] == pytest.approx(res.loss, rel=1e-6)
    assert out["val_acc"] == res.metrics["acc"] and out["val_f1"] == res.metrics["f1"]


def test_same_seed_same_results(index: DatasetIndex) -> None:
    a = [TrainingRun(HP, index, CPU).run_epoch() for _ in range(2)]
    assert a[0] == a[1]
    other = TrainingRun(replace(HP, seed=1), index, CPU).run_epoch()
    assert other["train_loss"] != a[0]["train_loss"]


def test_state_dict_round_trip_restores_model_and_epoch(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    run.run_epoch()
    saved_params = params(run)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)  # as the trainable does, before training on
    run.run_epoch()
    assert run.epoch == 2 and not same_state(saved_params, params(run))

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    run.load_state_dict(state)
    assert run.epoch == 1 and same_state(saved_params, params(run))

    fresh = TrainingRun(HP, index, CPU)
    assert not same_state(saved_params, params(fresh))
    fresh.load_state_dict(state)
    assert fresh.epoch == 1 and same_state(saved_params, params(fresh))
    assert fresh.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()
    for k, s in fresh.optimizer.state_dict()["state"].items():  # momentum buffers restored too
        assert torch.equal(s["momentum_buffer"], run.optimizer.state_dict()["state"][k]["momentum_buffer"])
    assert fresh.run_epoch()["epoch"] == 2


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resumed_run_matches_uninterrupted_run(index: DatasetIndex, schedule: str) -> None:
    hp = replace(HP, lr_schedule=schedule, epochs=3)
    straight = TrainingRun(hp, index, CPU)
    straight.run_epoch()
    expected = straight.run_epoch()

    first = TrainingRun(hp, index, CPU)
    first.run_epoch()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = TrainingRun(hp, index, CPU)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.run_epoch() == expected
    assert same_state(params(resumed), params(straight))


def test_cosine_schedule_is_torchs_cosine_annealing(index: DatasetIndex) -> None:
    epochs = 4
    run = TrainingRun(replace(HP, lr_schedule="cosine", epochs=epochs), index, CPU)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=HP.lr)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=epochs)
    used = []
    for _ in range(epochs):
        run.run_epoch()
        used.append(run.optimizer.param_groups[0]["lr"])  # the lr this epoch trained at
    expected = []
    for _ in range(epochs):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        annealing.step()
    assert used == pytest.approx(expected) and used[0] == HP.lr and used[-1] < 0.15 * HP.lr
    constant = TrainingRun(replace(HP, epochs=epochs), index, CPU)
    constant.run_epoch()
    assert constant.optimizer.param_groups[0]["lr"] == HP.lr


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_multi_label_run(index3: DatasetIndex, loss: str) -> None:
    hp = replace(HP_MULTI, loss=loss)
    run = TrainingRun(hp, index3, CPU)
    assert run.classes == ["covid", "normal", "pneumonia"]
    targets = run.val_loader.dataset.targets.numpy()
    labels = index3.labels("validation")
    assert targets.shape == (16 + 8, 3)
    assert (targets[labels == 0] == [1, 0, 1]).all()  # covid implies pneumonia
    assert (targets[labels == 1] == [0, 1, 0]).all() and (targets[labels == 2] == [0, 0, 1]).all()
    out = run.run_epoch()
    assert set(out) == EPOCH_KEYS and out["epoch"] == 1
    in_unit_interval(out)
    res = evaluate(run.model, run.val_loader, run.loss_fn, CPU, "multi", hp.threshold, 3)
    assert res.y_true.shape == res.y_pred.shape == (24, 3)
    assert set(np.unique(res.y_pred)) <= {0, 1}
    assert res.metrics == multi_label_metrics(res.y_true, res.y_pred)
    assert out["val_f1"] == res.metrics["f1_weighted"]


def test_evaluate_is_deterministic(index: DatasetIndex) -> None:
    run = TrainingRun(replace(HP, dropout=0.5), index, CPU)
    run.run_epoch()
    a = evaluate(run.model, run.val_loader, run.loss_fn, CPU, "single", 0.5, 2)
    b = evaluate(run.model, run.val_loader, run.loss_fn, CPU, "single", 0.5, 2)
    assert a.loss == b.loss and a.metrics == b.metrics
    assert np.array_equal(a.y_true, b.y_true) and np.array_equal(a.y_pred, b.y_pred)
    assert not run.model.training


def test_evaluate_metrics_match_recomputed(index: DatasetIndex) -> None:
    run = TrainingRun(HP, index, CPU)
    run.run_epoch()
    res = evaluate(run.model, run.val_loader, run.loss_fn, CPU, "single", 0.5, 2)
    assert np.array_equal(res.y_true, index.labels("validation"))  # fixed order, labels from the index
    assert res.metrics == single_label_metrics(res.y_true, res.y_pred, 2)
    assert res.metrics["acc"] == pytest.approx(float((res.y_true == res.y_pred).mean()))
    # predictions and loss agree with a direct pass over the same images
    images = torch.stack([run.val_loader.dataset[i][0] for i in range(len(run.val_loader.dataset))])
    with torch.no_grad():
        logits = run.model(images)
    assert np.array_equal(predict(logits, "single", 0.5).numpy(), res.y_pred)
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(res.y_true)).item()
    assert res.loss == pytest.approx(loss, rel=1e-5)


def test_frozen_backbone_trains_only_the_head(index: DatasetIndex) -> None:
    run = TrainingRun(replace(HP, freeze="fc_only"), index, CPU)
    before = params(run)
    run.run_epoch()
    after = params(run)
    for k in before:
        if k.startswith("net.features."):
            assert torch.equal(before[k], after[k]), k
        elif k.startswith("net.fc.") and k.endswith("weight"):
            assert not torch.equal(before[k], after[k]), k


def test_training_lowers_the_loss(index: DatasetIndex) -> None:
    run = TrainingRun(replace(HP, batch_size=4), index, CPU)
    history = [run.run_epoch() for _ in range(3)]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


class CountingStore:
    """A FeatureStore in a dict, counting the computations it let through."""

    def __init__(self) -> None:
        self.values: dict[str, tuple] = {}
        self.computed: list[str] = []

    def get_or_compute(self, key, compute):
        if key not in self.values:
            self.computed.append(key)
            self.values[key] = compute()
        return self.values[key]


def test_runs_sharing_a_frozen_prefix_compute_its_features_once(index: DatasetIndex) -> None:
    """Another lr, momentum or dropout keeps the prefix and its inputs: the second run computes no features
    and trains exactly as it does with its own; another seed (other initial weights) is another key."""
    hp = replace(HP, freeze="fc_only", dropout=0.3)
    other = replace(hp, lr=0.2, momentum=0.5, dropout=0.1)
    store = CountingStore()
    first = TrainingRun(hp, index, CPU, features=store)
    first.run_epoch()
    assert len(store.computed) == 1 and first.modes["feature_cache"] == 1
    shared = TrainingRun(other, index, CPU, features=store)
    assert shared.feature_key() == first.feature_key()
    got = [shared.run_epoch() for _ in range(2)]
    assert len(store.computed) == 1  # nothing computed for the second run
    alone = TrainingRun(other, index, CPU)
    want = [alone.run_epoch() for _ in range(2)]
    assert got == want
    assert same_state(shared.state_dict()["model"], alone.state_dict()["model"])
    assert TrainingRun(replace(hp, seed=1), index, CPU).feature_key() != first.feature_key()
    assert TrainingRun(replace(hp, image_size=28), index, CPU).feature_key() != first.feature_key()


def test_no_store_is_asked_without_a_feature_cache(index: DatasetIndex) -> None:
    store = CountingStore()
    run = TrainingRun(replace(HP, freeze="fc_only", feature_cache="off"), index, CPU, features=store)
    run.run_epoch()
    assert store.computed == [] and run.modes["feature_cache"] == 0
