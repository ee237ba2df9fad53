"""The sweep on Ray Tune: the Tuner, ASHA and the callbacks (live console, hyperparameters), in one place.

Connecting and cluster checks are :mod:`covid_tune.sweep.cluster`; the test evaluation on the workers is
:mod:`covid_tune.sweep.evaluation`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from covid_tune.data.cache import DecodedSplits
from covid_tune.data.dataset import DatasetIndex
from covid_tune.engine import schedule
from covid_tune.engine.checkpoints import RESUME_ONLY, STATE_FILE, finished_state
from covid_tune.engine.files import TRIALS_FILE
from covid_tune.engine.hparams import HParams
from covid_tune.models.weights import load_all
from covid_tune.results.collect import download_experiment
from covid_tune.spec.load import Spec
from covid_tune.sweep import cluster, resume_guard
from covid_tune.sweep.cluster import check_resources, check_shared_paths, models_travel, start_shared
from covid_tune.sweep.evaluation import EvaluateFinishedTrials, Evaluations, StartEvaluatorsNearTheEnd
from covid_tune.sweep.ray_internals import RecordStateDigest, ResumeFromLastReport, tuner_run_config
from covid_tune.sweep.search import cell_search
from covid_tune.sweep.trainable import release_feature_stores, train_trial

log = logging.getLogger(__name__)


def _trainable(spec: Spec, plan: dict[str, HParams], index: DatasetIndex, decoded: DecodedSplits | ray.ObjectRef | None,
               pretrained: dict[str, ray.ObjectRef] | None = None):
    # with_parameters puts each argument in Ray's object store once (a reference is used as it is):
    # one copy of the cache per node; pretrained is a small dict of references, one per backbone
    fn = tune.with_parameters(train_trial, plan=plan, index=index, cpus=spec.resources.cpus, gpu=spec.resources.gpu,
                              decoded=decoded, pretrained=pretrained, grace=spec.scheduler.grace_period,
                              share_features=spec.name,
                              select=(spec.scheduler.metric, spec.scheduler.mode, spec.scheduler.select))
    return tune.with_resources(fn, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpu})


class RecordHyperparameters(tune.Callback):
    """Add the trial's hyperparameters to each result as ``hp`` (progress.csv's ``hp/<name>`` columns):
    Tune's CSV logger leaves the config out; params.json, TensorBoard's HParams and the ResultGrid
    have it from the param_space."""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        result.setdefault("hp", {k: v for k, v in trial.config.items() if isinstance(v, (str, int, float, bool))})


class LiveView(tune.Callback):
    """Feed Tune's trial events to a :class:`covid_tune.cli.console.SweepConsole` (the compact console).

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
            # a restored trial that had reported its last epoch ends without a new result: its epoch
            # is the one Tune restored with it
            self.console.completed(self._cid(trial), (trial.last_result or {}).get("epoch"))

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


class TrialOutcomes(tune.Callback):
    """Which trials really ended (``ok`` or ``error``), by config id: Tune marks every trial it stops
    at an interruption (Ctrl-C) TERMINATED too, so its statuses cannot tell a finished trial from a cut one.

    Trials a restored sweep finds TERMINATED ended in an earlier run. Added after the Tuner is made
    (never pickled with it)."""

    def __init__(self) -> None:
        self.ended: dict[str, str] = {}
        self._restored = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if not self._restored:
            self._restored = True
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self.ended[trial.config.get("config_id")] = "ok" if trial.status == "TERMINATED" else "error"

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.config.get("config_id")] = "ok"

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended[trial.config.get("config_id")] = "error"

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.ended.pop(trial.config.get("config_id"), None)


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
    from covid_tune.spec.plan import tune_params

    values = tune_params(spec, plan)
    keys = [k for k in next(iter(values.values())) if k != "config_id"]
    return {"config_id": tune.grid_search(list(plan)), **{k: tune.sample_from(_ParamOf(values, k)) for k in keys}}


def _trial_dirname(trial) -> str:
    # short and readable (Tune's default appends every parameter, cut at 130 characters)
    return f"{trial.trial_id}_{trial.config.get('config_id', 'trial')}"


def _use_console(tuner, view, verbose: int, extra: list | None = None) -> None:
    """Give a (restored) Tuner this run's live view, Tune verbosity and ``extra`` callbacks (its run
    config was pickled; these are added after tuner.pkl is written, so never pickled with it)."""
    run_config = tuner_run_config(tuner)
    run_config.verbose = verbose
    fresh = ([view] if view is not None else []) + list(extra or [])
    run_config.callbacks = [c for c in (run_config.callbacks or [])
                            if not isinstance(c, (LiveView, TrialOutcomes, RecordStateDigest,
                                                  StartEvaluatorsNearTheEnd))] + fresh


def make_scheduler(spec: Spec) -> ASHAScheduler | FIFOScheduler:
    """Ray's ASHA with the spec's hedges (brackets, max_t, stop_last_trials), or FIFO without ASHA."""
    s = spec.scheduler
    if not s.asha:
        return FIFOScheduler()
    # a per-freeze-level grace counts in the trials' asha_time (covid_tune.engine.schedule), else in epochs
    return ASHAScheduler(time_attr=schedule.time_attr(s.grace_period), max_t=spec.asha_max_t,
                         grace_period=schedule.min_grace(s.grace_period),
                         reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=s.stop_last_trials)


def run_sweep(spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
              decoded: DecodedSplits | ray.ObjectRef | None = None,
              resume: bool = False, console=None, ray_output: bool = True,
              pretrained: dict[str, ray.ObjectRef] | None = None,
              evaluations: Evaluations | None = None, stop=None) -> dict[str, dict]:
    """Run (or, with ``resume``, restore and finish) the sweep.

    ``decoded`` is the decoded-image cache (``run.prepare_cache``) or its reference from :func:`share`;
    None trains from the image files. ``console`` (a ``console.SweepConsole``) gets every trial event;
    ``ray_output`` False silences Tune's own progress tables.
    ``pretrained`` is :func:`~covid_tune.sweep.cluster.start_shared`'s references to the backbones'
    state_dicts; without them, they are resolved here, on the driver (never by a trial), and shipped the
    same way.
    ``evaluations`` (:func:`start_evaluations`) starts each trial's test evaluation as it ends
    (a new sweep only: a restored one keeps the callbacks it was started with).

    ``stop`` (``run.StopSignals``) is told while Tune's loop runs (``in_tune``), so that SIGINT/SIGTERM
    end it the way Tune ends it on Ctrl-C (state saved for --resume); its ``signum`` says whether one came.

    Returns and writes to ``OUTPUT/trials.json`` each planned trial's status ("ok", "error", or
    "interrupted": cut short or never started), error, epochs reported and planned.
    """
    if pretrained is None:  # called without the driver's set-up (tests, benchmarks)
        states = load_all([h.backbone for h in plan.values()], spec.trainer.weights, spec.trainer.weights_download)
        decoded, pretrained = start_shared(spec, decoded, states)
    check_resources(spec)
    check_shared_paths(spec, index)
    path = spec.experiment_path
    trainable = _trainable(spec, plan, index, decoded, pretrained)
    view = LiveView(console, spec.scheduler.metric) if console is not None else None
    verbose = 1 if ray_output else 0
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {path}")
        problem = resume_guard.check_state(spec)  # also checked before anything is written (output_dir)
        if problem:
            raise ValueError(problem)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        # the restored sweep starts now: the last run's statuses are written again when it ends
        (spec.output_dir / TRIALS_FILE).unlink(missing_ok=True)
    else:
        resume_guard.clear_record(spec.output_dir)  # a new sweep's record
        sched = spec.scheduler
        scheduler = make_scheduler(spec)
        # optuna: the searcher hands out the plan's trials with its samples (sweep.search); else the plan's grid
        searched = spec.search.algorithm == "optuna"
        tuner = tune.Tuner(
            trainable,
            param_space={} if searched else param_space(spec, plan),
            # reuse_actors: a worker process that finished (or ASHA stopped) a trial starts the next one,
            # skipping a process start and torch's imports (seconds per trial); train_trial leaves no
            # thread or state behind
            tune_config=tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=scheduler,
                                        max_concurrent_trials=spec.ray.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname,
                                        search_alg=cell_search(spec, plan) if searched else None,
                                        num_samples=len(plan) if searched else 1),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=spec.storage_root,
                # the latest k (the selected epoch's weights travel in each, see trainable.Kept)
                checkpoint_config=tune.CheckpointConfig(num_to_keep=sched.keep_checkpoints),
                failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
                # pickled with the Tuner: also on --resume (EvaluateFinishedTrials then does nothing)
                callbacks=[ResumeFromLastReport(), RecordHyperparameters()]
                + ([EvaluateFinishedTrials(evaluations)] if evaluations is not None and evaluations.during_trials
                   else []),
            ),
        )
        resume_guard.record_experiment_state(spec)  # tuner.pkl, written once, just now
    outcomes = TrialOutcomes()
    trackers = []
    if spec.tracking.mlflow is not None or spec.tracking.wandb is not None:
        from covid_tune.sweep import tracking  # loads the trackers' packages: only when the spec names one

        trackers = tracking.callbacks(spec, plan)  # never pickled with the Tuner: a resumed sweep makes its own
    # a CPU sweep beyond top_k starts its evaluator pool as its last trials run (not pickled with the Tuner)
    pool = [StartEvaluatorsNearTheEnd(evaluations, len(plan))] if evaluations is not None else []
    _use_console(tuner, view, verbose, [outcomes, RecordStateDigest(str(spec.output_dir)), *trackers, *pool])
    if stop is not None:
        stop.in_tune = True
    try:
        grid = tuner.fit()
    finally:
        if stop is not None:
            stop.in_tune = False
        release_feature_stores(spec.name)  # the sweep's shared feature caches
        resume_guard.record_experiment_state(spec)  # the state Tune saved last
    trials = trial_outcomes(plan, grid, outcomes.ended, interrupted=bool(stop is not None and stop.signum))
    finish_checkpoints(grid, {c for c, status in outcomes.ended.items() if status == "ok"})
    (spec.output_dir / TRIALS_FILE).write_text(json.dumps(trials, indent=2))
    if spec.remote_storage:
        download_experiment(spec)
    failed = [c for c, t in trials.items() if t["status"] == "error"]
    if failed:
        log.warning(f"{len(failed)} trial(s) failed: {', '.join(failed)}")
    return trials


def finish_checkpoints(grid, finished: set[str]) -> int:
    """Drop the optimizer and RNG states from the kept checkpoints of the ``finished`` trials (by config
    id): nothing resumes them. Each state file is replaced whole (a copy, then a rename), so a driver
    killed meanwhile leaves the old one or the new one; a trial whose files cannot be read is left as it
    is. Returns how many files were rewritten."""
    import io

    import pyarrow.fs

    done = 0
    for result in grid:
        if (result.config or {}).get("config_id") not in finished:
            continue
        checkpoints = [c for c, _ in (result.best_checkpoints or [])] or [c for c in [result.checkpoint] if c]
        for checkpoint in checkpoints:
            fs, path = checkpoint.filesystem, f"{checkpoint.path}/{STATE_FILE}"
            try:
                if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
                    continue
                with fs.open_input_stream(path) as f:
                    state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
                if RESUME_ONLY[0] not in state:
                    continue
                buffer = io.BytesIO()
                torch.save(finished_state(state), buffer)
                with fs.open_output_stream(path + ".tmp") as f:
                    f.write(buffer.getvalue())
                fs.move(path + ".tmp", path)
                done += 1
            except Exception as exc:  # noqa: BLE001 - a smaller footprint is never worth failing a sweep over
                log.warning(f"could not drop the optimizer state of {path}: {type(exc).__name__}: {exc}")
    return done


def trial_outcomes(plan: dict[str, HParams], grid, ended: dict[str, str], interrupted: bool) -> dict[str, dict]:
    """Each planned trial's status, error and epochs. A trial is "ok" only where Tune completed it
    (:class:`TrialOutcomes`), or, in a run no signal cut, where it reported its last epoch; else it is
    "interrupted" (a pending trial has no config in the ResultGrid yet: it counts 0 epochs)."""
    results = {}
    for result in grid:
        cid = (result.config or {}).get("config_id")
        if cid is not None:
            results[cid] = result
    trials = {}
    for cid, hp in plan.items():
        result = results.get(cid)
        epochs = int((result.metrics or {}).get("epoch") or 0) if result is not None else 0
        error = result.error if result is not None else None
        if error:
            status = "error"
        elif cid in ended:
            status = ended[cid]
        else:
            status = "ok" if not interrupted and epochs >= hp.epochs else "interrupted"
        trials[cid] = {"status": status, "error": str(error).splitlines()[0][:500] if error else None,
                       "epochs": epochs, "epochs_max": hp.epochs}
    return trials


def disconnect() -> None:
    """Leave Ray (:func:`covid_tune.sweep.cluster.disconnect`): a Ray this driver started stops with it, its
    processes included; one the caller had started stays up."""
    cluster.disconnect()


def start_evaluations(spec: Spec, plan: dict[str, HParams], index: DatasetIndex,
                      decoded: DecodedSplits | ray.ObjectRef | None,
                      pretrained: dict[str, ray.ObjectRef] | None = None) -> Evaluations | None:
    """:class:`Evaluations` for this sweep (call after :func:`~covid_tune.sweep.cluster.start_shared`), or None
    where the exported models' folder need not be visible to the workers (a cluster joined, several nodes,
    a storage URI):
    :func:`evaluate_remote` then ships each model to its task."""
    if spec.remote_storage or models_travel(spec):
        return None
    # during the trials only where every configuration will be evaluated: beyond report.top_k only the
    # shortlist is, known when the last trial ends (evaluating every trial cost ~0.25 s each at 256 trials)
    during = spec.resources.gpu == 0 and len(plan) <= spec.report.top_k
    evaluations = Evaluations(spec, plan, index, decoded, during_trials=during, pretrained=pretrained)
    return evaluations
