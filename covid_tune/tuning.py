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

from covid_tune.cache import DecodedSplits
from covid_tune.data import DatasetIndex
from covid_tune.engine import HParams
from covid_tune.results import TRIALS_FILE, download_experiment
from covid_tune.spec import Spec
from covid_tune.trainable import train_trial


_joined_cluster = False  # set by connect(): this driver joined a running cluster


MIN_OBJECT_STORE = 512 * 1024**2


def connect(address: str | None, cache_bytes: int = 0) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); with neither, start Ray locally.

    A local Ray's object store gets room for the decoded cache of ``cache_bytes`` (one copy per node)
    plus a quarter for what else travels through it, at least 512 MB: smaller would spill the cache
    to disk-backed memory. A cluster's nodes size their own."""
    global _joined_cluster
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        # Ray Client runs this driver here but Tune's storage, the exported models and the report on
        # the cluster: the paths would not match. A job (or a shell on the head) runs it where they do.
        raise ValueError(f"--address {address}: Ray Client (ray://) addresses are not supported; submit the "
                         "sweep as a job instead (ray job submit --address http://HEAD:8265 -- python -m "
                         "covid_tune.run SPEC), or run it on the head node with --address auto")
    if address:
        ray.init(address=address, log_to_driver=True)
        _joined_cluster = True
    else:
        # address="local": a new Ray instance even when `ray start` (or a test cluster) recorded one
        # in /tmp/ray/ray_current_cluster, which ray.init() would otherwise silently join.
        ray.init(address="local", include_dashboard=False,
                 object_store_memory=max(MIN_OBJECT_STORE, int(cache_bytes * 1.25)), log_to_driver=True)


def share(decoded: DecodedSplits | None) -> "ray.ObjectRef | None":
    """Put the decoded cache in the object store once (call after :func:`connect`): passing the
    returned reference to :func:`run_sweep` and :func:`evaluate_remote` keeps one copy per node for both."""
    return ray.put(decoded) if decoded is not None else None


def on_cluster(spec: Spec) -> bool:
    """True when this sweep joined a running cluster (--address, RAY_ADDRESS, ray.address)."""
    return bool(spec.ray.address or os.environ.get("RAY_ADDRESS"))


def check_resources(spec: Spec) -> None:
    """Refuse a trial size that no node could ever hold (Tune would otherwise wait forever).

    Only checked on a local Ray: a cluster's autoscaler may still add GPU nodes.
    """
    if on_cluster(spec):
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


PROBE_TIMEOUT_S = 60.0


def _local_storage_folder(spec: Spec) -> str | None:
    """The folder behind ``ray.storage_path`` when it is one (a path or a file:// URI), else None."""
    root = spec.storage_root
    if root.startswith("file://"):
        return root[len("file://"):] or "/"
    return None if spec.remote_storage else root


def check_shared_paths(spec: Spec, index: DatasetIndex) -> None:
    """On a multi-node cluster every node must see the data and the storage folder.

    Ray Tune no longer syncs trial results to the head node, so a folder that only the head has
    would scatter checkpoints over the workers' disks. A probe task on each live node checks
    (nodes the autoscaler adds later are not probed: use shared or cloud storage up front).
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    data_key = "data.root" if spec.data.root else "data.synthetic (generated under the output folder)"
    probes = {data_key: (str(index.root), next(iter(index.paths("train")), str(index.root)))}
    storage = _local_storage_folder(spec)
    if storage is not None:
        Path(storage).mkdir(parents=True, exist_ok=True)
        marker = Path(storage) / f".covid_tune-probe-{uuid.uuid4().hex}"
        marker.write_text("probe")
        probes["ray.storage_path"] = (spec.storage_root, str(marker))
    try:
        for key, (shown, path) in probes.items():
            refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _path_exists.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path)
                for n in nodes}
            blind = []
            for name, ref in refs.items():
                try:
                    seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
                    # a node that just died or cannot run a task now: not evidence either way
                    print(f"covid_tune: could not check {key} on node {name}: {type(exc).__name__}", file=sys.stderr)
                    continue
                if not seen:
                    blind.append(name)
            if blind:
                raise ValueError(
                    f"{key} {shown} is not visible from node(s) {', '.join(blind)}. On a multi-node cluster "
                    "Ray Tune no longer syncs trial results to the head node, so a folder only the head has "
                    "would scatter checkpoints over the workers' disks: put ray.storage_path on a shared "
                    "filesystem (NFS, ...) or use a cloud URI (s3://..., gs://...), and data.root on a shared "
                    "filesystem (or the same path on every node, e.g. a cluster.yaml file_mount).")
    finally:
        if "ray.storage_path" in probes:
            Path(probes["ray.storage_path"][1]).unlink(missing_ok=True)


def _trainable(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, decoded: "DecodedSplits | ray.ObjectRef | None"):
    # with_parameters puts each argument in Ray's object store once (a reference is used as it is):
    # one copy of the cache per node
    fn = tune.with_parameters(train_trial, plan=plan, index=index, cpus=spec.resources.cpus, gpu=spec.resources.gpu,
                              decoded=decoded)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})


class RecordTrialNode(tune.Callback):
    """Add ``node_id`` (the Ray node running the trial) to every result that lacks it.

    Hostname and IP, which Tune adds itself, do not tell apart several Ray nodes on one machine or
    behind one address; the node id does. Looked up once per trial process in Ray's actor table,
    on the driver, before Tune's loggers write the result (results.csv takes it from there).
    """

    def __init__(self) -> None:
        self._nodes: dict[str, str | None] = {}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("node_id"):
            return
        try:
            actor = trial.temporary_state.ray_actor
            key = actor._actor_id.hex()
            if key not in self._nodes:
                from ray._private.state import actors

                self._nodes[key] = (actors(key).get("Address") or {}).get("NodeID")
            if self._nodes[key]:
                result["node_id"] = self._nodes[key]
        except Exception:  # noqa: BLE001 - a missing node id must not stop a sweep
            pass

    def __getstate__(self) -> dict:
        return {"_nodes": {}}


class ResumeFromLastReport(tune.Callback):
    """Resume a restored or retried trial from the checkpoint of its last *reported* epoch.

    What Tune restores from lags what it has reported. Its experiment snapshot (which checkpoint
    each trial resumes from) is saved every few seconds and synced to storage together with the
    trials' result.json, in the background, so the copy of result.json can already hold rows the
    snapshot does not know; and a function trainable's checkpoint is registered one round trip after
    its result is logged. A driver killed then, or a trial process dying then, would make Tune train
    the reported epochs again from an older checkpoint. Every reported epoch's checkpoint is complete
    on storage (a trial persists it before it reports), so this registers the one named by the last
    row of result.json (or by the last result seen) as the trial's latest: on the first step of a
    restored run, and whenever a failed trial is requeued. Anything unexpected leaves Tune's own
    choice in place (those epochs are then trained twice and the report keeps the later rows).
    """

    def __init__(self) -> None:
        self._checked = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._checked:
            return
        self._checked = True
        for trial in trials:
            self._catch_up(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._catch_up(trial)

    @staticmethod
    def _catch_up(trial) -> None:
        try:
            _save_logged_rows(trial)
            _catch_up_checkpoint(trial)
        except Exception as exc:  # noqa: BLE001 - never stop a sweep over this repair
            print(f"covid_tune: could not check trial {trial}'s last checkpoint: {type(exc).__name__}: {exc}",
                  file=sys.stderr)

    def __getstate__(self) -> dict:
        return {"_checked": False}


def _reported_rows(trial) -> list[dict]:
    """``trial``'s reported results that name a checkpoint, oldest first.

    From result.json on storage (what the last sync saved), from the driver's own staging copy of
    it (a driver restored in the same Ray session, e.g. a job submitted again to the same cluster,
    finds the rows its killed predecessor logged but never synced; Tune syncs them up later) and
    from the last result Tune holds (the newest while the driver lives, when a trial is retried).
    """
    import pyarrow.fs

    texts = []
    fs = trial.storage.storage_filesystem
    path = f"{trial.storage.trial_fs_path}/result.json"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(path) as f:
            texts.append(f.read().decode())
    staged = Path(trial.storage.trial_driver_staging_path, "result.json")
    if staged.is_file():
        texts.append(staged.read_text())
    rows = [dict(trial.last_result or {})]
    for text in texts:
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut off when the driver died
                continue
    by_iteration = {r["training_iteration"]: r for r in rows
                    if r.get("checkpoint_dir_name") and "epoch" in r and "training_iteration" in r}
    return [by_iteration[i] for i in sorted(by_iteration)]


def _save_logged_rows(trial) -> bool:
    """Copy the driver's result.json of ``trial`` to storage when it holds more rows than storage.

    When a trial (re)starts, Tune's JSON logger replaces the driver's copy of result.json with the
    one on storage, which is only as new as the last experiment sync: a trial retried after its
    worker or node died would lose the rows reported since. Saving the driver's copy first (it only
    ever grows, and storage only ever holds an older copy of it) keeps them.
    """
    staged = Path(trial.storage.trial_driver_staging_path, "result.json")
    if not staged.is_file():
        return False
    data = staged.read_bytes()
    fs = trial.storage.storage_filesystem
    path = f"{trial.storage.trial_fs_path}/result.json"
    info = fs.get_file_info(path)
    if info.size is not None and info.size >= len(data):
        return False
    with fs.open_output_stream(path) as f:
        f.write(data)
    return True


def _complete_checkpoint(fs, folder: str, epoch: int) -> bool:
    """Whether ``folder`` holds a whole checkpoint of ``epoch`` (state written, metrics agreeing)."""
    import pyarrow.fs

    from covid_tune.trainable import METRICS_FILE, STATE_FILE

    if fs.get_file_info(f"{folder}/{STATE_FILE}").type != pyarrow.fs.FileType.File:
        return False
    try:
        with fs.open_input_stream(f"{folder}/{METRICS_FILE}") as f:
            return int(json.loads(f.read()).get("epoch", -1)) == int(epoch)
    except (OSError, ValueError):
        return False


def _catch_up_checkpoint(trial) -> bool:
    """Make ``trial`` resume from the checkpoint of its last reported epoch (see ResumeFromLastReport).

    Also drops from Tune's bookkeeping the checkpoints a killed driver deleted after its last
    snapshot (Tune would otherwise fail on them later). Returns whether the resume point moved.
    """
    import pyarrow.fs
    from ray.train._internal.session import _TrainingResult

    if trial.status not in ("PENDING", "PAUSED"):
        return False
    rows = _reported_rows(trial)
    if not rows:
        return False
    fs = trial.storage.storage_filesystem
    manager = trial.run_metadata.checkpoint_manager
    exists = {}
    for result in [*manager._checkpoint_results, manager._latest_checkpoint_result]:
        if result is not None and result.checkpoint.path not in exists:
            found = fs.get_file_info(result.checkpoint.path).type
            exists[result.checkpoint.path] = found != pyarrow.fs.FileType.NotFound
    current = manager._latest_checkpoint_result
    was = Path(current.checkpoint.path).name if current is not None else "the start"
    chosen = next((r for r in reversed(rows) if _complete_checkpoint(
        fs, f"{trial.storage.trial_fs_path}/{r['checkpoint_dir_name']}", r["epoch"])), None)
    gone = [p for p, ok in exists.items() if not ok]
    if gone:
        manager._checkpoint_results = [r for r in manager._checkpoint_results if exists[r.checkpoint.path]]
        if current is not None and not exists[current.checkpoint.path]:
            manager._latest_checkpoint_result = max(manager._checkpoint_results, default=None,
                                                    key=lambda r: r.metrics.get("training_iteration", 0))
        trial.invalidate_json_state()
        trial.run_metadata.invalidate_cache()
    current = manager._latest_checkpoint_result
    at = current.metrics.get("training_iteration", 0) if current is not None else 0
    if chosen is None or at >= chosen["training_iteration"] or (
            current is not None and Path(current.checkpoint.path).name == chosen["checkpoint_dir_name"]):
        again = [r["epoch"] for r in rows if r["training_iteration"] > at]
        if again:
            where = Path(current.checkpoint.path).name if current is not None else "the start"
            print(f"covid_tune: {trial}: resuming from {where}; the checkpoints of reported epoch(s) {again} "
                  "are gone, they are trained again", file=sys.stderr)
        return False
    name = chosen["checkpoint_dir_name"]
    folder = f"{trial.storage.trial_fs_path}/{name}"
    # the trainable numbers its next checkpoint one past the trial's index, which on_checkpoint
    # sets to this checkpoint's (it adds 1, as after any checkpoint)
    trial.storage.current_checkpoint_index = int(name.rsplit("_", 1)[1]) - 1
    trial.on_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(folder, filesystem=fs), metrics=chosen))
    lost = [r["epoch"] for r in rows if r["training_iteration"] > chosen["training_iteration"]]
    print(f"covid_tune: {trial}: resuming from {name} (epoch {chosen['epoch']}"
          + (f"; the checkpoints of reported epoch(s) {lost} are gone, they are trained again" if lost
             else ", its last reported one") + f"), not {was} as Tune's state had it", file=sys.stderr)
    return True


def make_scheduler(spec: Spec) -> "ASHAScheduler | FIFOScheduler":
    """Ray's ASHA with the spec's hedges (brackets, max_t, stop_last_trials), or FIFO without ASHA."""
    s = spec.scheduler
    if not s.asha:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t or spec.trainer.epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=s.stop_last_trials)


def run_sweep(spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
              decoded: "DecodedSplits | ray.ObjectRef | None" = None,
              resume: bool = False) -> dict[str, dict]:
    """Run (or, with ``resume``, restore and finish) the sweep.

    ``decoded`` is the decoded-image cache (``cache.prepare_cache``) or its reference from :func:`share`;
    None trains from the image files.

    Returns and writes to ``OUTPUT/trials.json`` each trial's status ("ok" or "error") and error.
    """
    connect(spec.ray.address, decoded.nbytes if isinstance(decoded, DecodedSplits) else 0)
    check_resources(spec)
    check_shared_paths(spec, index)
    path = spec.experiment_path
    trainable = _trainable(spec, plan, index, decoded)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        sched = spec.scheduler
        scheduler = make_scheduler(spec)
        tuner = tune.Tuner(
            trainable,
            param_space={"config_id": tune.grid_search(list(plan))},
            # reuse_actors: a worker process that finished (or ASHA stopped) a trial starts the next one,
            # skipping a process start and torch's imports (seconds per trial); train_trial leaves no
            # thread or state behind
            tune_config=tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=scheduler,
                                        max_concurrent_trials=spec.ray.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage_root,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=sched.keep_checkpoints,
                                                        checkpoint_score_attribute=sched.metric,
                                                        checkpoint_score_order=sched.mode),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
                callbacks=[ResumeFromLastReport(), RecordTrialNode()],  # pickled with the Tuner: also on --resume
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


def _evaluate_shipped(evaluate: Callable[..., dict], files: dict[str, bytes], index: DatasetIndex,
                      **kwargs) -> dict:
    """``evaluate`` on a copy of an exported model folder written to this worker's disk."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="covid_tune-eval-") as d:
        for name, blob in files.items():
            (Path(d) / name).write_bytes(blob)
        return evaluate(d, index, **kwargs)


def evaluate_remote(evaluate: Callable[..., dict], model_dirs: list[Path], index: DatasetIndex,
                    cpus: float, gpu: float, ship: bool | None = None,
                    decoded: "DecodedSplits | ray.ObjectRef | None" = None) -> list[dict]:
    """Run ``evaluate(model_dir, index, decoded=...)`` for each exported model as Ray tasks, where workers are.

    ``decoded`` (the decoded cache; pass :func:`share`'s reference to reuse the sweep's copy) spares
    each task decoding the splits it holds.

    The exported models live under the driver's output folder. On a cluster (``ship`` None: when
    this driver joined one) that folder need not be visible from the workers, so each model's
    files travel through the object store to a temporary folder on the worker, and the result is
    cached in the model folder here (``eval.json``), as a local evaluation would.
    """
    if ship is None:
        ship = _joined_cluster or len([n for n in ray.nodes() if n.get("Alive")]) > 1
    index_ref = ray.put(index)
    extra = {} if decoded is None else {"decoded": decoded if isinstance(decoded, ray.ObjectRef) else ray.put(decoded)}
    if not ship:
        task = ray.remote(num_cpus=cpus, num_gpus=gpu, max_retries=2)(evaluate)
        return ray.get([task.remote(str(d), index_ref, **extra) for d in model_dirs])
    from covid_tune.results import EVAL_FILE

    task = ray.remote(num_cpus=cpus, num_gpus=gpu, max_retries=2)(_evaluate_shipped)
    refs = []
    for d in model_dirs:
        files = {f.name: f.read_bytes() for f in Path(d).iterdir() if f.is_file() and not f.name.endswith(".tmp")}
        refs.append(task.remote(evaluate, ray.put(files), index_ref, **extra))
    outs = ray.get(refs)
    for d, out in zip(model_dirs, outs):
        tmp = Path(d) / (EVAL_FILE + ".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(Path(d) / EVAL_FILE)
    return outs
