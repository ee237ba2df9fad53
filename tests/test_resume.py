"""The private Ray Tune names covid_tune.sweep.ray_internals relies on, checked against the installed Ray.

These fail by name on a Ray version that moves or renames them (pyproject pins the tested range);
tests/test_cluster.py exercises the repair itself (driver SIGKILL, --resume).
"""

from __future__ import annotations

import inspect

import pytest


def test_checkpoint_manager_keeps_the_lists_the_repair_edits() -> None:
    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    assert manager._checkpoint_results == []
    assert manager._latest_checkpoint_result is None


def test_training_result_takes_a_checkpoint_and_metrics(tmp_path) -> None:
    from ray import tune
    from ray.train._internal.session import _TrainingResult

    result = _TrainingResult(checkpoint=tune.Checkpoint(str(tmp_path)), metrics={"epoch": 1})
    assert result.checkpoint.path == str(tmp_path) and result.metrics == {"epoch": 1}


@pytest.mark.parametrize("name", ["current_checkpoint_index", "trial_fs_path", "trial_driver_staging_path",
                                  "experiment_driver_staging_path", "experiment_fs_path", "storage_filesystem"])
def test_storage_context_has(name: str) -> None:
    from ray.train._internal.storage import StorageContext

    assert name in inspect.getsource(StorageContext), f"StorageContext.{name} is gone"


@pytest.mark.parametrize("name", ["on_checkpoint", "invalidate_json_state", "storage", "run_metadata",
                                  "last_result", "status"])
def test_trial_has(name: str) -> None:
    from ray.tune.experiment import Trial

    assert name in inspect.getsource(Trial), f"Trial.{name} is gone"


def test_trial_metadata_has_a_checkpoint_manager_and_a_cache_to_invalidate() -> None:
    from ray.tune.experiment.trial import _TrainingRunMetadata

    meta = _TrainingRunMetadata()
    assert hasattr(meta, "checkpoint_manager") and callable(meta.invalidate_cache)


def test_callback_hooks_the_repair_overrides() -> None:
    from ray import tune

    from covid_tune.sweep.ray_internals import ResumeFromLastReport

    for hook in ("on_step_begin", "on_trial_recover"):
        assert hook in vars(tune.Callback), f"tune.Callback.{hook} is gone"
        assert hook in vars(ResumeFromLastReport)


def test_tune_state_files_the_resume_guard_covers() -> None:
    """covid_tune.sweep.resume_guard hashes every top-level file of the experiment folder; these are the names
    Tune's restore reads (and unpickles) in the installed Ray."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl.tuner_internal import _TUNER_PKL
    from ray.tune.search.basic_variant import BasicVariantGenerator

    assert _TUNER_PKL == "tuner.pkl"
    assert TuneController.CKPT_FILE_TMPL == "experiment_state-{}.json"
    assert BasicVariantGenerator.CKPT_FILE_TMPL == "basic-variant-state-{}.json"
    from ray.tune.search import Searcher

    assert Searcher.CKPT_FILE_TMPL == "searcher-state-{}.pkl"  # resume_guard.RESAVED names these three
    # the signal path: Tune ends its loop on SIGUSR1, and leaves SIGINT alone when told to
    from ray.tune import tune as tune_run

    source = inspect.getsource(tune_run._setup_signal_catching)
    assert "TUNE_DISABLE_SIGINT_HANDLER" in source and "SIGUSR1" in source
def test_tuner_run_config_reads_the_local_tuner(tmp_path) -> None:
    from ray import tune

    from covid_tune.sweep.ray_internals import tuner_run_config

    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="x", storage_path=str(tmp_path), verbose=0))
    assert tuner_run_config(tuner).name == "x"


def test_the_worker_output_dispatcher_exists() -> None:
    from covid_tune.sweep.ray_internals import stdstream_dispatcher

    assert hasattr(stdstream_dispatcher(), "handlers")


def test_the_mlflow_callback_keeps_its_runs_by_trial(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from covid_tune.sweep.ray_internals import mlflow_run_id

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    callback = MLflowLoggerCallback(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment_name="x")
    callback.setup()
    assert callback._trial_runs == {} and mlflow_run_id(callback, "t") is None
