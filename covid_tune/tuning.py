"""Everything that talks to Ray: starting/connecting, the Tuner, and remote evaluation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from covid_tune.data import DatasetIndex
from covid_tune.engine import HParams
from covid_tune.results import TRIALS_FILE
from covid_tune.spec import Spec
from covid_tune.trainable import train_trial



def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); with neither, start Ray locally."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # a small object store: trials share only the dataset index and plan through it
        ray.init(include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=True)


def _trainable(spec: Spec, plan: dict[str, HParams], index: DatasetIndex):
    fn = tune.with_parameters(train_trial, plan=plan, index=index, cpus=spec.resources.cpus, gpu=spec.resources.gpu)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})


def run_sweep(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, resume: bool = False) -> dict[str, dict]:
    """Run (or, with ``resume``, restore and finish) the sweep.

    Returns and writes to ``OUTPUT/trials.json`` each trial's status ("ok" or "error") and error.
    """
    connect(spec.ray.address)
    path = spec.experiment_dir
    trainable = _trainable(spec, plan, index)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        sched = spec.scheduler
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=spec.trainer.epochs, grace_period=sched.grace_period,
                                   reduction_factor=sched.reduction_factor)
                     if sched.asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space={"config_id": tune.grid_search(list(plan))},
            tune_config=tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=scheduler,
                                        max_concurrent_trials=spec.ray.max_concurrent),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(spec.experiment_dir.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=sched.keep_checkpoints,
                                                        checkpoint_score_attribute=sched.metric,
                                                        checkpoint_score_order=sched.mode),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
            ),
        )
    grid = tuner.fit()
    trials = {}
    for result in grid:
        cid = result.config["config_id"]
        trials[cid] = {"status": "error" if result.error else "ok",
                       "error": str(result.error).splitlines()[0][:500] if result.error else None}
    (spec.output_dir / TRIALS_FILE).write_text(json.dumps(trials, indent=2))
    failed = [c for c, t in trials.items() if t["status"] == "error"]
    if failed:
        print(f"covid_tune: {len(failed)} trial(s) failed: {', '.join(failed)}", file=sys.stderr)
    return trials


def evaluate_remote(evaluate: Callable[..., dict], model_dirs: list[Path], index: DatasetIndex,
                    cpus: float, gpu: float) -> list[dict]:
    """Run ``evaluate(model_dir, index)`` for each exported model as Ray tasks, where workers are."""
    task = ray.remote(num_cpus=cpus, num_gpus=gpu, max_retries=2)(evaluate)
    index_ref = ray.put(index)
    return ray.get([task.remote(str(d), index_ref) for d in model_dirs])
