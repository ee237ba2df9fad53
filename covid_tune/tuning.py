"""Everything that talks to Ray: starting/connecting, the Tuner, and remote evaluation."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from covid_tune.data import DatasetIndex
from covid_tune.engine import HParams
from covid_tune.results import TRIALS_FILE, download_experiment
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
        # address="local": a new Ray instance even when `ray start` (or a test cluster) recorded one
        # in /tmp/ray/ray_current_cluster, which ray.init() would otherwise silently join.
        # A small object store: trials share only the dataset index and plan through it.
        ray.init(address="local", include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=True)


def check_resources(spec: Spec) -> None:
    """Refuse a trial size that no node could ever hold (Tune would otherwise wait forever).

    Only checked on a local Ray: a cluster's autoscaler may still add GPU nodes.
    """
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for name, want in (("CPU", spec.resources.cpus), ("GPU", spec.resources.gpu)):
        if want > have.get(name, 0):
            key = "resources.cpus" if name == "CPU" else "resources.gpu"
            raise ValueError(f"{key}={want:g} but this machine's Ray has {have.get(name, 0):g} {name}(s); "
                             f"use --set {key}={have.get(name, 0):g} or run on a cluster (--address)")


@ray.remote(num_cpus=0)
def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def check_shared_paths(spec: Spec, index: DatasetIndex) -> None:
    """On a multi-node cluster every node must see the data and the storage folder.

    Ray Tune no longer syncs trial results to the head node, so a folder that only the head has
    would scatter checkpoints over the workers' disks. A probe task on each live node checks.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    probes = {"data.root": next(iter(index.paths("train")), str(index.root))}
    if not spec.remote_storage:
        Path(spec.storage_root).mkdir(parents=True, exist_ok=True)
        marker = Path(spec.storage_root) / f".covid_tune-probe-{uuid.uuid4().hex}"
        marker.write_text("probe")
        probes["ray.storage_path"] = str(marker)
    try:
        for key, path in probes.items():
            refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _path_exists.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
                for n in nodes}
            blind = [name for name, ref in refs.items() if not ray.get(ref)]
            if blind:
                shown = spec.storage_root if key == "ray.storage_path" else index.root
                raise ValueError(
                    f"{key} {shown} is not visible from node(s) {', '.join(blind)}. On a multi-node cluster "
                    "Ray Tune no longer syncs trial results to the head node: put ray.storage_path on a shared "
                    "filesystem (NFS, ...) or use a cloud URI (s3://..., gs://...), and data.root on a shared "
                    "filesystem.")
    finally:
        if "ray.storage_path" in probes:
            Path(probes["ray.storage_path"]).unlink(missing_ok=True)


def _trainable(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, decoded=None):
    if decoded is None and spec.data.cache:  # built (or read back from OUTPUT/cache) here unless given
        from covid_tune.cache import prepare_cache
        decoded = prepare_cache(spec, index)
    # with_parameters puts each argument in Ray's object store once: one copy of the cache per node
    fn = tune.with_parameters(train_trial, plan=plan, index=index, cpus=spec.resources.cpus, gpu=spec.resources.gpu,
                              decoded=decoded)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})


def run_sweep(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, resume: bool = False) -> dict[str, dict]:
    """Run (or, with ``resume``, restore and finish) the sweep.

    Returns and writes to ``OUTPUT/trials.json`` each trial's status ("ok" or "error") and error.
    """
    connect(spec.ray.address)
    check_resources(spec)
    check_shared_paths(spec, index)
    path = spec.experiment_path
    trainable = _trainable(spec, plan, index)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
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
                storage_path=spec.storage_root,
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
    if spec.remote_storage:
        download_experiment(spec)
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
