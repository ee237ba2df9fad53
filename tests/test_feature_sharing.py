"""Trials of one node that share a frozen prefix compute its feature cache once (trainable.RayFeatureStore)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_helpers import TINY_HP as TINY

from covid_tune.data.dataset import scan_dataset
from covid_tune.data.synthetic import make_synthetic
from covid_tune.sweep.trainable import (
    FEATURES_ACTOR,
    FEATURES_NAMESPACE,
    _from_arrays,
    _to_arrays,
    release_feature_stores,
)


def test_features_travel_as_arrays_bit_for_bit() -> None:
    tensors = (torch.randn(5, 3).to(torch.bfloat16), torch.arange(5), torch.rand(4, 2, 2))
    back = _from_arrays(_to_arrays(tensors))
    assert [t.dtype for t in back] == [t.dtype for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))


@pytest.mark.slow
def test_two_trials_with_the_same_prefix_compute_it_once(tmp_path) -> None:
    import ray

    from covid_tune.engine.training import TrainingRun
    from covid_tune.sweep.trainable import RayFeatureStore

    index = scan_dataset(make_synthetic(tmp_path / "d", counts={"train": 16, "validation": 8, "test": 2},
                                        image_size=36))
    hp = replace(TINY, freeze="fc_only")
    configs = [hp, replace(hp, lr=0.2, dropout=0.1), replace(hp, seed=1)]  # the last: another prefix

    @ray.remote(num_cpus=1)
    def trial(hp, index) -> tuple[dict, str]:
        torch.set_num_threads(1)
        run = TrainingRun(hp, index, torch.device("cpu"), features=RayFeatureStore("sharing-test"))
        return run.run_epoch(), run.feature_key()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = ray.get([trial.remote(h, index) for h in configs])
        node = ray.get_runtime_context().get_node_id()
        registry = ray.get_actor(f"{FEATURES_ACTOR}-sharing-test-{node}", namespace=FEATURES_NAMESPACE)
        assert ray.get(registry.count.remote()) == 2  # one per distinct prefix, not one per trial
        assert results[0][1] == results[1][1] != results[2][1]
        alone = TrainingRun(configs[1], index, torch.device("cpu")).run_epoch()
        assert results[1][0] == pytest.approx(alone, rel=1e-6)
        assert release_feature_stores("sharing-test") == 1 and release_feature_stores("sharing-test") == 0
    finally:
        ray.shutdown()
