"""Everything that talks to Ray: starting/connecting, the Tuner, and remote evaluation."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from covid_tune import schedule
from covid_tune.cache import DecodedSplits
from covid_tune.data import DatasetIndex
from covid_tune.engine import HParams
from covid_tune.results import TRIALS_FILE, download_experiment
from covid_tune.resume import ResumeFromLastReport
from covid_tune.spec import Spec
from covid_tune.trainable import train_trial
from covid_tune.weights import load_all, state_nbytes

MIN_OBJECT_STORE = 512 * 1024**2


def _quiet_ray() -> dict:
    """ray.init options (and logger levels) that keep Ray's warnings but drop its info chatter, here and
    in the workers (e.g. a "Checkpoint successfully created" line per epoch per trial)."""
    # Tune's repeated "Experiment state snapshotting ..." advice (3 lines each) on a busy machine; the
    # documented switch, and a user's own setting wins
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # one notice per start that a local Ray uses token authentication (shown with -v)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}


def connect(address: str | None, cache_bytes: int = 0, quiet: bool = False) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``); with neither, start Ray locally.

    A local Ray's object store gets room for ``cache_bytes`` (the decoded cache and pretrained weights, one copy each)
    plus a quarter for what else travels through it, at least 512 MB: smaller would spill the cache
    to disk-backed memory. A cluster's nodes size their own. ``quiet``: Ray logs warnings and errors
    only (worker output, spilling and trial errors still reach this console)."""
    if ray.is_initialized():
        return
    extra = _quiet_ray() if quiet else {}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        # Ray Client runs this driver here but Tune's storage, the exported models and the report on
        # the cluster: the paths would not match. A job (or a shell on the head) runs it where they do.
        raise ValueError(f"--address {address}: Ray Client (ray://) addresses are not supported; submit the "
                         "sweep as a job instead (ray job submit --address http://HEAD:8265 -- python -m "
                         "covid_tune.run SPEC), or run it on the head node with --address auto")
    if address:
        ray.init(address=address, log_to_driver=True, **extra)
    else:
        # address="local": a new Ray instance even when `ray start` (or a test cluster) recorded one
        # in /tmp/ray/ray_current_cluster, which ray.init() would otherwise silently join.
        ray.init(address="local", include_dashboard=False,
                 object_store_memory=max(MIN_OBJECT_STORE, int(cache_bytes * 1.25)), log_to_driver=True,
                 **extra)


def models_travel(spec: Spec) -> bool:
    """Whether the exported models' folder may be invisible to the workers, so models travel through the
    object store: this sweep joined a cluster (:func:`on_cluster`: it may scale up onto other machines),
    or Ray spans several nodes. Call after :func:`connect`."""
    return on_cluster(spec) or len([n for n in ray.nodes() if n.get("Alive")]) > 1


def share(decoded: DecodedSplits | None) -> "ray.ObjectRef | None":
    """Put the decoded cache in the object store once (call after :func:`connect`): passing the
    returned reference to :func:`run_sweep` and :func:`evaluate_remote` keeps one copy per node for both."""
    return ray.put(decoded) if decoded is not None else None


def share_weights(states: dict[str, dict]) -> "dict[str, ray.ObjectRef]":
    """Put each backbone's pretrained state_dict (:func:`covid_tune.weights.load_all`) in the object store
    once (call after :func:`connect`). Trials fetch theirs from there, so no node needs the file or a
    network; the driver may drop its copies afterwards."""
    return {backbone: ray.put(state) for backbone, state in states.items()}


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


def _trainable(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, decoded: "DecodedSplits | ray.ObjectRef | None",
               pretrained: "dict[str, ray.ObjectRef] | None" = None):
    # with_parameters puts each argument in Ray's object store once (a reference is used as it is):
    # one copy of the cache per node; pretrained is a small dict of references, one per backbone
    fn = tune.with_parameters(train_trial, plan=plan, index=index, cpus=spec.resources.cpus, gpu=spec.resources.gpu,
                              decoded=decoded, pretrained=pretrained, grace=spec.scheduler.grace_period)
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})


class RecordHyperparameters(tune.Callback):
    """Add the trial's hyperparameters to each result as ``hp`` (progress.csv's ``hp/<name>`` columns):
    Tune's CSV logger leaves the config out; params.json, TensorBoard's HParams and the ResultGrid
    have it from the param_space."""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        result.setdefault("hp", {k: v for k, v in trial.config.items() if isinstance(v, (str, int, float, bool))})


def cluster_resources() -> dict[str, float]:
    """CPUs and GPUs of the Ray this driver is connected to."""
    have = ray.cluster_resources()
    return {"CPU": have.get("CPU", 0.0), "GPU": have.get("GPU", 0.0)}


class LiveView(tune.Callback):
    """Feed Tune's trial events to a :class:`covid_tune.console.SweepConsole` (the compact console).

    Not pickled with the Tuner (a console holds a stream): a restored sweep gets a new one."""

    def __init__(self, console, metric: str) -> None:
        self.console, self.metric = console, metric

    @staticmethod
    def _cid(trial) -> str:
        return trial.config.get("config_id", str(trial))

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console is not None:
            self.console.started(self._cid(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if self.console is not None and "epoch" in result:
            self.console.result(self._cid(trial), int(result["epoch"]), result.get(self.metric))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console is not None:
            self.console.completed(self._cid(trial))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console is not None:
            self.console.failed(self._cid(trial), _error_text(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        if self.console is not None:
            self.console.retrying(self._cid(trial), _error_text(trial))

    def on_experiment_end(self, trials: list, **info) -> None:
        if self.console is not None:
            self.console.close()

    def __getstate__(self) -> dict:
        return {"console": None, "metric": self.metric}


def _error_text(trial) -> str:
    try:
        return Path(trial.error_file).read_text() if trial.error_file else "unknown error"
    except OSError:
        return "unknown error (no error file)"


class _ParamOf:
    """``tune.sample_from`` of one hyperparameter: its value in the trial's plan entry (by config id)."""

    def __init__(self, values: dict[str, dict], key: str) -> None:
        self.values, self.key = values, key

    def __call__(self, config: dict):
        return self.values[config["config_id"]][self.key]


def param_space(spec: Spec, plan: dict[str, HParams]) -> dict:
    """Tune's search space: a grid over config ids, every hyperparameter resolved from the plan.

    The trainable still trains ``plan[config_id]`` (the plan is the source of truth); the other keys
    make params.json, progress.csv, TensorBoard's HParams and the ResultGrid show the real values."""
    from covid_tune.plan import tune_params

    values = tune_params(spec, plan)
    keys = [k for k in next(iter(values.values())) if k != "config_id"]
    return {"config_id": tune.grid_search(list(plan)), **{k: tune.sample_from(_ParamOf(values, k)) for k in keys}}


def _trial_dirname(trial) -> str:
    # short and readable (Tune's default appends every parameter, cut at 130 characters)
    return f"{trial.trial_id}_{trial.config.get('config_id', 'trial')}"


def _use_console(tuner, view, verbose: int) -> None:
    """Give a (restored) Tuner this run's live view and Tune verbosity (its run config was pickled)."""
    run_config = tuner._local_tuner.get_run_config()
    run_config.verbose = verbose
    run_config.callbacks = [c for c in (run_config.callbacks or []) if not isinstance(c, LiveView)] \
        + ([view] if view is not None else [])


def make_scheduler(spec: Spec) -> "ASHAScheduler | FIFOScheduler":
    """Ray's ASHA with the spec's hedges (brackets, max_t, stop_last_trials), or FIFO without ASHA."""
    s = spec.scheduler
    if not s.asha:
        return FIFOScheduler()
    # a per-freeze-level grace counts in the trials' asha_time (covid_tune.schedule), else in epochs
    return ASHAScheduler(time_attr=schedule.time_attr(s.grace_period), max_t=s.max_t or spec.trainer.epochs,
                         grace_period=schedule.min_grace(s.grace_period),
                         reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=s.stop_last_trials)


def run_sweep(spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
              decoded: "DecodedSplits | ray.ObjectRef | None" = None,
              resume: bool = False, console=None, ray_output: bool = True,
              pretrained: "dict[str, ray.ObjectRef] | None" = None,
              evaluations: "Evaluations | None" = None) -> dict[str, dict]:
    """Run (or, with ``resume``, restore and finish) the sweep.

    ``decoded`` is the decoded-image cache (``run.prepare_cache``) or its reference from :func:`share`;
    None trains from the image files. ``console`` (a ``console.SweepConsole``) gets every trial event;
    ``ray_output`` False silences Tune's own progress tables.
    ``pretrained`` is :func:`share_weights` of the backbones' state_dicts; without it they are
    resolved here, on the driver (never by a trial).
    ``evaluations`` (:func:`start_evaluations`) starts each trial's test evaluation as it ends
    (a new sweep only: a restored one keeps the callbacks it was started with).

    Returns and writes to ``OUTPUT/trials.json`` each trial's status ("ok" or "error") and error.
    """
    states: dict[str, dict] = {}
    if pretrained is None:
        states = load_all([h.backbone for h in plan.values()], spec.trainer.weights, spec.trainer.weights_download)
    connect(spec.ray.address, (decoded.nbytes if isinstance(decoded, DecodedSplits) else 0) + state_nbytes(states))
    if pretrained is None:
        pretrained = share_weights(states)
        states.clear()  # the object store holds them now
    check_resources(spec)
    check_shared_paths(spec, index)
    path = spec.experiment_path
    trainable = _trainable(spec, plan, index, decoded, pretrained)
    view = LiveView(console, spec.scheduler.metric) if console is not None else None
    verbose = 1 if ray_output else 0
    if not ray_output:
        # Tune's newer console prints its experiment box and folders even at verbose=0; the older
        # one (Ray's documented switch) prints nothing at verbose=0. A user's own setting wins.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        sched = spec.scheduler
        scheduler = make_scheduler(spec)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec, plan),
            # reuse_actors: a worker process that finished (or ASHA stopped) a trial starts the next one,
            # skipping a process start and torch's imports (seconds per trial); train_trial leaves no
            # thread or state behind
            tune_config=tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=scheduler,
                                        max_concurrent_trials=spec.ray.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage_root,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=sched.keep_checkpoints,
                                                        checkpoint_score_attribute=sched.metric,
                                                        checkpoint_score_order=sched.mode),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
                # pickled with the Tuner: also on --resume (EvaluateFinishedTrials then does nothing)
                callbacks=[ResumeFromLastReport(), RecordHyperparameters()]
                + ([EvaluateFinishedTrials(evaluations)] if evaluations is not None and evaluations.during_trials
                   else []),
            ),
        )
    _use_console(tuner, view, verbose)
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
                    cpus: float, gpu: float, ship: bool,
                    decoded: "DecodedSplits | ray.ObjectRef | None" = None) -> list[dict]:
    """Run ``evaluate(model_dir, index, decoded=...)`` for each exported model as Ray tasks, where workers are.

    ``decoded`` (the decoded cache; pass :func:`share`'s reference to reuse the sweep's copy) spares
    each task decoding the splits it holds.

    The exported models live under the driver's output folder. With ``ship``
    (:func:`models_travel`: on a cluster) that folder need not be visible from the workers, so each model's
    files travel through the object store to a temporary folder on the worker, and the result is
    cached in the model folder here (``eval.json``), as a local evaluation would.
    """
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


class _Evaluator:
    """A Ray actor that exports and evaluates best checkpoints, one per node: torch is imported once,
    the sweep's decoded cache comes zero-copy from the node's object store, and the test split (which
    trials never read, so it is not in the cache) is decoded once here for every configuration."""

    def __init__(self, index: DatasetIndex, decoded: DecodedSplits | None, cpus: float,
                 pretrained: "dict[str, ray.ObjectRef] | None" = None, explain: dict | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.index, self.decoded, self._with_test = index, decoded, None
        self._pretrained = pretrained or {}  # backbone -> reference (the trials' own copy)
        self._explain = explain  # the spec's report settings: shortcut check, Grad-CAM sample

    def _splits(self) -> DecodedSplits | None:
        if self.decoded is None or "test" in self.decoded.arrays:
            return self.decoded
        if self._with_test is None:
            from covid_tune.cache import build_split

            d = self.decoded
            test, key, _ = build_split(self.index.paths("test"), d.image_size, d.grayscale, split="test")
            self._with_test = DecodedSplits({**d.arrays, "test": test}, d.image_size, d.grayscale,
                                            {**d.keys, "test": key})
        return self._with_test

    def evaluate(self, model_dir: str) -> dict:
        from covid_tune.results import evaluate_export

        return evaluate_export(model_dir, self.index, decoded=self._splits(), explain=self._explain)

    def export_and_evaluate(self, rec, hp: HParams, classes: list[str], metric: str, mode: str,
                            out_dir: Path, figures_dir: Path, label_mode: str) -> tuple[str, dict] | None:
        """Export the trial's best epoch, evaluate it, and draw its report figures (which the report
        then finds current)."""
        from covid_tune import figures
        from covid_tune.results import export_best  # the one best-epoch selection, as the report makes it

        ref = self._pretrained.get(hp.backbone)
        target = export_best(rec, hp, classes, metric, mode, out_dir, ray.get(ref) if ref is not None else None)
        if target is None:
            return None
        ev = self.evaluate(str(target))
        row = {"config_id": rec.config_id, "history": rec.history, "eval": ev["splits"], "best_epoch": ev["epoch"]}
        figures.write_figures(figures_dir, [row], classes, label_mode)
        return str(target), ev


class Evaluations:
    """The test evaluation of a sweep's best checkpoints, all in one :class:`_Evaluator` actor.

    With ``during_trials``, :meth:`trial_finished` (called by :class:`EvaluateFinishedTrials` as each
    trial ends) exports that trial's best epoch and evaluates it while the other trials train; the
    actor then asks Ray for no CPU, so it never holds back a trial (it uses what training leaves idle).
    Without it (GPU sweeps: an actor holding a GPU share could starve a retried trial), the actor,
    with a trial's resources, evaluates everything after the trials. :meth:`evaluator` serves the
    report's evaluation from what is done and evaluates the rest in the same actor.
    Made by :func:`start_evaluations` for a single-node Ray with local storage.
    """

    def __init__(self, spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
                 decoded: "DecodedSplits | ray.ObjectRef | None", during_trials: bool,
                 pretrained: "dict[str, ray.ObjectRef] | None" = None) -> None:
        self.spec, self.plan, self.index, self.during_trials = spec, plan, index, during_trials
        self._pretrained = pretrained
        self._decoded = decoded if decoded is None or isinstance(decoded, ray.ObjectRef) else ray.put(decoded)
        self._handle = None
        self._pending: dict[str, "ray.ObjectRef"] = {}
        self._done: dict[str, dict] = {}  # model folder -> evaluation
        self.early = 0  # evaluations started as their trial ended (while others still trained)

    def _actor(self):
        if self._handle is None:
            res = self.spec.resources
            opts = dict(num_cpus=0, num_gpus=0) if self.during_trials else dict(num_cpus=res.cpus, num_gpus=res.gpu)
            # the decoded cache goes as its reference: the actor maps the object store's copy
            self._handle = ray.remote(_Evaluator).options(**opts).remote(self.index, self._decoded, res.cpus,
                                                                          self._pretrained, self.spec.report.model_dump())
        return self._handle

    def trial_finished(self, trial) -> None:
        """Export and evaluate a finished trial's best checkpoint (never raises: the report retries)."""
        from covid_tune.results import read_trial

        try:
            cid = trial.config["config_id"]
            rec = read_trial(cid, Path(trial.storage.trial_fs_path),
                             Path(trial.storage.trial_driver_staging_path) / "result.json")
            self._pending[cid] = self._actor().export_and_evaluate.remote(
                rec, self.plan[cid], self.index.classes, self.spec.scheduler.metric, self.spec.scheduler.mode,
                self.spec.output_dir / "best", self.spec.output_dir / "report" / "figures", self.spec.data.label_mode)
            self.early += 1
        except Exception as exc:  # noqa: BLE001
            print(f"covid_tune: could not start the evaluation of {trial}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)

    def wait(self) -> None:
        """Wait for the evaluations started during the trials."""
        for cid, ref in self._pending.items():
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:
                print(f"covid_tune: evaluation of {cid} failed, retried for the report: {exc}", file=sys.stderr)
                continue
            if out is not None:
                self._done[out[0]] = out[1]
        self._pending.clear()

    def evaluator(self, model_dirs: list[Path], index: DatasetIndex) -> list[dict]:
        """``results.assemble``'s evaluator: finished evaluations of the same epoch, the rest in the actor."""
        self.wait()
        out: dict[int, "dict | ray.ObjectRef"] = {}
        for i, d in enumerate(model_dirs):
            done = self._done.get(str(d))
            epoch = json.loads((Path(d) / "model.json").read_text())["epoch"]
            if done is not None and done.get("epoch") == epoch:
                out[i] = done
            else:
                out[i] = self._actor().evaluate.remote(str(d))
        return [ray.get(v) if isinstance(v, ray.ObjectRef) else v for _, v in sorted(out.items())]

    def close(self) -> None:
        if self._handle is not None:
            ray.kill(self._handle)
            self._handle = None


def start_evaluations(spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
                      decoded: "DecodedSplits | ray.ObjectRef | None",
                      pretrained: "dict[str, ray.ObjectRef] | None" = None) -> Evaluations | None:
    """:class:`Evaluations` for this sweep (call after :func:`connect`), or None where the exported
    models' folder need not be visible to the workers (a cluster joined, several nodes, a storage URI):
    :func:`evaluate_remote` then ships each model to its task."""
    if spec.remote_storage or models_travel(spec):
        return None
    return Evaluations(spec, plan, index, decoded, during_trials=spec.resources.gpu == 0, pretrained=pretrained)


class EvaluateFinishedTrials(tune.Callback):
    """Start each trial's test evaluation as soon as it ends (see :class:`Evaluations`)."""

    def __init__(self, evaluations: Evaluations) -> None:
        self._evaluations: Evaluations | None = evaluations

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if self._evaluations is not None:
            self._evaluations.trial_finished(trial)

    def __getstate__(self) -> dict:
        return {"_evaluations": None}  # actors do not outlive this driver: a restored sweep evaluates after
