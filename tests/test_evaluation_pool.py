"""The test evaluation after the trials spreads over every free worker (sweep.evaluation.Evaluations)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from engine_helpers import TINY_HP

from covid_tune.sweep.evaluation import free_slots


def test_free_slots_counts_trial_sized_workers() -> None:
    assert free_slots(1, 0, {"CPU": 2.0}) == 2
    assert free_slots(2, 0, {"CPU": 5.0}) == 2
    assert free_slots(1, 0.5, {"CPU": 8.0, "GPU": 1.0}) == 2  # the GPUs limit it
    assert free_slots(1, 0, {}) == 1  # nothing free (yet): one worker, which Ray queues
    assert free_slots(0, 0, {"CPU": 4.0}) == 1


def _export(folder: Path, hp, classes: list[str]) -> Path:
    """An exported model folder as export_best writes it, without training (a fresh tiny CNN)."""
    from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model, save_exported

    model = create_model(hp.backbone, len(classes), freeze=hp.freeze, weights="none", head_hidden=hp.head_hidden,
                         dropout=hp.dropout)
    meta = {**asdict(hp), "config_id": folder.name, "classes": classes, "epoch": 1,
            "metrics": {"val_loss": 0.7}, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "preprocess": "", "source_checkpoint": ""}
    save_exported(model.state_dict(), meta, folder)
    return folder


@pytest.mark.slow
def test_the_evaluator_uses_every_free_worker(tmp_path: Path, tiny_raw: dict) -> None:
    import ray

    from covid_tune.data.dataset import scan_dataset
    from covid_tune.data.synthetic import make_synthetic
    from covid_tune.spec.load import validate
    from covid_tune.sweep.evaluation import Evaluations

    index = scan_dataset(make_synthetic(tmp_path / "d", counts={"train": 8, "validation": 6, "test": 6},
                                        image_size=36))
    spec = validate({**tiny_raw, "report": {"shortcut_check": False, "gradcam": {"per_class": 0}}})
    hp = replace(TINY_HP, image_size=32)
    dirs = [_export(tmp_path / "best" / f"c{i}", replace(hp, seed=i), index.classes) for i in range(4)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        evaluations = Evaluations(spec, {}, index, None, during_trials=False)
        try:
            evs = evaluations.evaluator(dirs, index)
        finally:
            evaluations.close()
    finally:
        ray.shutdown()
    assert [e["epoch"] for e in evs] == [1] * 4
    assert all(e["splits"]["test"]["n"] == len(index.paths("test")) for e in evs)
    pids = {e["worker"]["pid"] for e in evs}
    assert len(pids) == 2  # two free CPUs, a trial's 1 CPU each: two workers, two models each
    # each result is its own model's (the batches come back in order): the cached eval.json agrees
    for d, e in zip(dirs, evs):
        assert json.loads((d / "eval.json").read_text())["splits"]["test"]["loss"] == e["splits"]["test"]["loss"]


def test_the_pool_starts_when_no_more_trials_are_left_than_slots() -> None:
    from covid_tune.sweep.evaluation import StartEvaluatorsNearTheEnd

    class Fake:
        started = 0

        def slots(self) -> int:
            return 2

        def prestart(self) -> None:
            self.started += 1

    fake = Fake()
    callback = StartEvaluatorsNearTheEnd(fake, n_trials=5)
    for _ in range(2):
        callback.on_trial_complete(0, [], None)
    assert fake.started == 0  # 3 trials left, 2 slots: the pool would take cores trials need
    callback.on_trial_error(0, [], None)
    assert fake.started == 1  # 2 left: the next ones start in slots the sweep is about to leave idle
    import pickle

    assert pickle.loads(pickle.dumps(callback))._evaluations is None  # a restored one does nothing
