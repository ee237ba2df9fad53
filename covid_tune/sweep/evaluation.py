"""Test evaluation of a sweep's best checkpoints on Ray workers: one actor per sweep that exports and
evaluates each trial's best epoch as the trial ends (reusing the decoded cache in the object store),
or plain tasks that ship each exported model to a worker on a cluster. :mod:`covid_tune.sweep.tuning`
decides which, and builds the Tuner that calls back here."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune

from covid_tune.data.cache import DecodedSplits
from covid_tune.data.dataset import DatasetIndex
from covid_tune.engine.files import EVAL_FILE, MODEL_META, write_atomic
from covid_tune.engine.hparams import HParams
from covid_tune.spec.load import Spec

log = logging.getLogger(__name__)


def folder_files(folder: Path) -> dict[str, bytes]:
    """An exported model folder's files by relative path (an ensemble's ``members/`` included), to travel."""
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.endswith(".tmp")}


def _evaluate_shipped(evaluate: Callable[..., dict], files: dict[str, bytes], index: DatasetIndex,
                      **kwargs) -> dict:
    """``evaluate`` on a copy of an exported model folder written to this worker's disk."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="covid_tune-eval-") as d:
        for name, blob in files.items():
            (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / name).write_bytes(blob)
        return evaluate(d, index, **kwargs)


def evaluate_remote(evaluate: Callable[..., dict], model_dirs: list[Path], index: DatasetIndex,
                    cpus: float, gpu: float, ship: bool,
                    decoded: DecodedSplits | ray.ObjectRef | None = None) -> list[dict]:
    """Run ``evaluate(model_dir, index, decoded=...)`` for each exported model as Ray tasks, where workers are.

    ``decoded`` (the decoded cache; pass :func:`share`'s reference to reuse the sweep's copy) spares
    each task decoding the splits it holds.

    The exported models live under the driver's output folder. With ``ship``
    (:func:`covid_tune.sweep.cluster.models_travel`: on a cluster) that folder need not be visible from the
    workers, so each model's files travel through the object store to a temporary folder on the worker, and
    the result is cached in the model folder here (``eval.json``), as a local evaluation would.
    """
    index_ref = ray.put(index)
    extra = {} if decoded is None else {"decoded": decoded if isinstance(decoded, ray.ObjectRef) else ray.put(decoded)}
    if not ship:
        task = ray.remote(num_cpus=cpus, num_gpus=gpu, max_retries=2)(evaluate)
        return ray.get([task.remote(str(d), index_ref, **extra) for d in model_dirs])

    task = ray.remote(num_cpus=cpus, num_gpus=gpu, max_retries=2)(_evaluate_shipped)
    refs = []
    for d in model_dirs:
        files = folder_files(Path(d))
        refs.append(task.remote(evaluate, ray.put(files), index_ref, **extra))
    outs = ray.get(refs)
    for d, out in zip(model_dirs, outs):
        write_atomic(Path(d) / EVAL_FILE, json.dumps(out))
    return outs


class _Evaluator:
    """A Ray actor that exports and evaluates best checkpoints, one per node: torch is imported once,
    the sweep's decoded cache comes zero-copy from the node's object store, and the test split (which
    trials never read, so it is not in the cache) is decoded once here for every configuration."""

    def __init__(self, index: DatasetIndex, decoded: DecodedSplits | None, cpus: float,
                 pretrained: dict[str, ray.ObjectRef] | None = None, explain: dict | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        import covid_tune.results.collect  # noqa: F401 - imported now: an actor started early is ready when needed

        self.index, self.decoded, self._with_test = index, decoded, None
        self._pretrained = pretrained or {}  # backbone -> reference (the trials' own copy)
        self._explain = explain  # the spec's report settings: shortcut check, Grad-CAM sample

    def _splits(self) -> DecodedSplits | None:
        if self.decoded is None or "test" in self.decoded.arrays:
            return self.decoded
        if self._with_test is None:
            from covid_tune.data.cache import build_split

            d = self.decoded
            test, key, _ = build_split(self.index.paths("test"), d.image_size, d.grayscale, split="test")
            self._with_test = DecodedSplits({**d.arrays, "test": test}, d.image_size, d.grayscale,
                                            {**d.keys, "test": key})
        return self._with_test

    def evaluate(self, model_dir: str) -> dict:
        """The evaluation of one exported model, with ``worker`` (this process's pid and Ray node)."""
        import os

        from covid_tune.results.collect import evaluate_export

        ev = evaluate_export(model_dir, self.index, decoded=self._splits(), explain=self._explain)
        return {**ev, "worker": {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}}

    def evaluate_many(self, model_dirs: list[str]) -> list[dict]:
        """:meth:`evaluate` of a batch, one after another in this worker (one call per batch)."""
        return [self.evaluate(d) for d in model_dirs]

    def export_and_evaluate(self, rec, hp: HParams, classes: list[str], metric: str, mode: str,
                            out_dir: Path, figures_dir: Path, label_mode: str) -> tuple[str, dict] | None:
        """Export the trial's best epoch, evaluate it, and draw its report figures (which the report
        then finds current)."""
        from covid_tune.report import figures
        from covid_tune.results.collect import export_best  # the one best-epoch selection, as the report makes it

        ref = self._pretrained.get(hp.backbone)
        target = export_best(rec, hp, classes, metric, mode, out_dir, ray.get(ref) if ref is not None else None)
        if target is None:
            return None
        ev = self.evaluate(str(target))
        row = {"config_id": rec.config_id, "history": rec.history, "eval": ev["splits"], "best_epoch": ev["epoch"]}
        figures.write_figures(figures_dir, [row], classes, label_mode)
        return str(target), ev


def free_slots(cpus: float, gpu: float, available: dict[str, float]) -> int:
    """How many workers of a trial's size (``cpus``, ``gpu``) fit in Ray's ``available`` resources (at least 1)."""
    fits = []
    if cpus > 0:
        fits.append(int(available.get("CPU", 0.0) // cpus))
    if gpu > 0:
        fits.append(int(available.get("GPU", 0.0) // gpu))
    return max(1, min(fits) if fits else 1)


class Evaluations:
    """The test evaluation of a sweep's best checkpoints in :class:`_Evaluator` actors.

    With ``during_trials``, :meth:`trial_finished` (called by :class:`EvaluateFinishedTrials` as each
    trial ends) exports that trial's best epoch and evaluates it while the other trials train, in one
    actor that asks Ray for no CPU, so it never holds back a trial (it uses what training leaves idle).
    :func:`start_evaluations` asks for that only where every configuration will be evaluated (no more
    than ``report.top_k``: beyond it only the shortlist is, and the shortlist is known at the end), and
    not on GPUs (an actor holding a GPU share could starve a retried trial).
    :meth:`evaluator` serves the report's evaluation from what is done and evaluates the rest after the
    trials on every free worker: one actor with a trial's resources per free slot, each given one batch.
    Made by :func:`start_evaluations` for a single-node Ray with local storage.
    """

    def __init__(self, spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
                 decoded: DecodedSplits | ray.ObjectRef | None, during_trials: bool,
                 pretrained: dict[str, ray.ObjectRef] | None = None) -> None:
        self.spec, self.plan, self.index, self.during_trials = spec, plan, index, during_trials
        self._pretrained = pretrained
        self._decoded = decoded if decoded is None or isinstance(decoded, ray.ObjectRef) else ray.put(decoded)
        self._handle = None
        self._pool: list = []  # the actors of the evaluation after the trials
        self._prestarted = False
        self._pending: dict[str, ray.ObjectRef] = {}
        self._done: dict[str, dict] = {}  # model folder -> evaluation
        self.early = 0  # evaluations started as their trial ended (while others still trained)

    def _new_actor(self, **opts):
        res = self.spec.resources
        # the decoded cache goes as its reference: the actor maps the object store's copy
        return ray.remote(_Evaluator).options(**opts).remote(
            self.index, self._decoded, res.cpus, self._pretrained, self.spec.report.model_dump())

    def _actor(self):
        """The actor of the evaluations during the trials (no resources: what training leaves idle)."""
        if self._handle is None:
            self._handle = self._new_actor(num_cpus=0, num_gpus=0)
        return self._handle

    def slots(self) -> int:
        """Trial-sized slots of the cluster (CPU: the pool :meth:`prestart` makes)."""
        return free_slots(self.spec.resources.cpus, 0, ray.cluster_resources())

    def prestart(self) -> None:
        """Start the pool of a CPU sweep now, while its last trials run (:class:`StartEvaluatorsNearTheEnd`):
        one actor per slot of a trial's size on the cluster (at most what a shortlist can hold), asking Ray
        for no CPU, so that their start-up (a process, torch's and covid_tune's imports) overlaps the last
        trials instead of following them. Nothing where trials are evaluated as they end."""
        res = self.spec.resources
        if self.during_trials or res.gpu or self._pool:  # a GPU actor needs its share, which a trial may hold
            return
        n = min(self.slots(), 2 * self.spec.report.top_k, len(self.plan))
        self._pool = [self._new_actor(num_cpus=0, num_gpus=0, scheduling_strategy="SPREAD") for _ in range(n)]
        self._prestarted = True

    def _workers(self, n: int) -> list:
        """Up to ``n`` actors with a trial's resources, one per slot free now (at least one); the pool
        :meth:`prestart` made, where it did."""
        if self._prestarted:
            return self._pool[:max(1, min(n, len(self._pool)))]
        res = self.spec.resources
        want = min(n, free_slots(res.cpus, res.gpu, ray.available_resources()))
        while len(self._pool) < want:
            self._pool.append(self._new_actor(num_cpus=res.cpus, num_gpus=res.gpu, scheduling_strategy="SPREAD"))
        return self._pool[:max(want, 1)]

    def trial_finished(self, trial) -> None:
        """Export and evaluate a finished trial's best checkpoint (never raises: the report retries)."""
        from covid_tune.results.collect import read_trial
        from covid_tune.spec.plan import with_trial_values

        try:
            cid = trial.config["config_id"]
            rec = read_trial(cid, Path(trial.storage.trial_fs_path),
                             Path(trial.storage.trial_driver_staging_path) / "result.json")
            hp = with_trial_values(self.plan[cid], trial.config)  # with what a searcher sampled
            self._pending[cid] = self._actor().export_and_evaluate.remote(
                rec, hp, self.index.classes, self.spec.scheduler.metric, self.spec.scheduler.mode,
                self.spec.output_dir / "best", self.spec.output_dir / "report" / "figures", self.spec.data.label_mode)
            self.early += 1
        except Exception as exc:  # noqa: BLE001
            log.warning(f"could not start the evaluation of {trial}: {type(exc).__name__}: {exc}")

    def wait(self) -> None:
        """Wait for the evaluations started during the trials."""
        for cid, ref in self._pending.items():
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:
                log.warning(f"evaluation of {cid} failed, retried for the report: {exc}")
                continue
            if out is not None:
                self._done[out[0]] = out[1]
        self._pending.clear()

    def evaluator(self, model_dirs: list[Path], index: DatasetIndex) -> list[dict]:
        """``results.assemble``'s evaluator: finished evaluations of the same epoch, the rest in the actor."""
        self.wait()
        out: dict[int, dict] = {}
        todo: list[int] = []
        for i, d in enumerate(model_dirs):
            done = self._done.get(str(d))
            epoch = json.loads((Path(d) / MODEL_META).read_text())["epoch"]
            if done is not None and done.get("epoch") == epoch:
                out[i] = done
            else:
                todo.append(i)
        if todo:
            if self._handle is not None:  # the trials' actor is done: its process makes room for the pool
                ray.kill(self._handle)
                self._handle = None
            workers = self._workers(len(todo))
            batches = [todo[k::len(workers)] for k in range(len(workers))]  # one batch per worker
            refs = [w.evaluate_many.remote([str(model_dirs[i]) for i in batch]) for w, batch in zip(workers, batches)]
            for batch, evs in zip(batches, ray.get(refs)):
                out.update(zip(batch, evs))
        return [out[i] for i in range(len(model_dirs))]

    def close(self) -> None:
        for actor in ([self._handle] if self._handle is not None else []) + self._pool:
            ray.kill(actor)
        self._handle, self._pool = None, []


class StartEvaluatorsNearTheEnd(tune.Callback):
    """:meth:`Evaluations.prestart` once no more trials are left to start than there are slots: the
    pool's start-up then takes cores the sweep is about to leave idle, not cores its trials need."""

    def __init__(self, evaluations: Evaluations, n_trials: int) -> None:
        self._evaluations, self._n_trials, self._ended = evaluations, n_trials, 0
        self._slots: int | None = None

    def _ended_one(self) -> None:
        if self._evaluations is None:
            return
        self._ended += 1
        try:
            if self._slots is None:
                self._slots = self._evaluations.slots()
            if self._n_trials - self._ended <= self._slots:
                self._evaluations.prestart()
        except Exception as exc:  # noqa: BLE001 - the pool then starts after the trials
            log.warning(f"could not start the evaluators early: {type(exc).__name__}: {exc}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended_one()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended_one()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_evaluations": None}  # not pickled in practice: added after the Tuner is saved


class EvaluateFinishedTrials(tune.Callback):
    """Start each trial's test evaluation as soon as it ends (see :class:`Evaluations`)."""

    def __init__(self, evaluations: Evaluations) -> None:
        self._evaluations: Evaluations | None = evaluations

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if self._evaluations is not None:
            self._evaluations.trial_finished(trial)

    def __getstate__(self) -> dict:
        return {"_evaluations": None}  # actors do not outlive this driver: a restored sweep evaluates after
