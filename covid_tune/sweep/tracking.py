"""Experiment trackers (``tracking`` in the spec): each trial a run of MLflow or Weights & Biases through
Ray's own logger callbacks, and, once the report is written, REPORT.md and the chosen model logged too.

Imported only where the spec names a tracker: Ray's W&B integration imports wandb when it loads. The
packages are optional extras; ``covid_tune.cli.preflight.tracking_problems`` refuses a spec naming a
missing one before anything starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

from covid_tune.engine.files import EVAL_FILE, MODEL_META
from covid_tune.engine.hparams import HParams
from covid_tune.spec.load import Spec
from covid_tune.sweep.ray_internals import mlflow_run_id

log = logging.getLogger(__name__)

OUTPUT_TAG = "covid_tune.output"  # each MLflow run's tag: the sweep's output folder (an experiment may hold several)
CHOSEN_TAG = "covid_tune.chosen"  # set on the run of the configuration the report chose


def hparams(hp: HParams) -> dict[str, str | int | float | bool | None]:
    """Every hyperparameter of a trial as one flat dict of plain values (a dict or list as JSON)."""
    return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in asdict(hp).items()}


class MLflowTrials(MLflowLoggerCallback):
    """Ray's MLflow callback (one run per trial: Tune's config as params, each result's numbers as metrics
    by epoch), whose runs also get every hyperparameter of the trial's :class:`HParams`, not only the
    grid's axes that Tune's config holds."""

    def __init__(self, plan: dict[str, HParams], **kwargs) -> None:
        super().__init__(**kwargs)
        self.params = {cid: hparams(hp) for cid, hp in plan.items()}

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)
        run_id = mlflow_run_id(self, trial)
        extra = self.params.get(trial.config.get("config_id"), {})
        if run_id is not None and extra:
            # the same value again is allowed: the grid's axes are in Tune's config too
            self.mlflow_util.log_params(run_id=run_id, params_to_log={k: v for k, v in extra.items()
                                                                      if k not in trial.config})


class WandbTrials(WandbLoggerCallback):
    """Ray's W&B callback (one run per trial, logged from a Ray actor on the driver's node), whose runs'
    config also gets every hyperparameter of the trial's :class:`HParams`: each result's ``config`` is
    what Ray's actor adds to the run's config."""

    def __init__(self, plan: dict[str, HParams], **kwargs) -> None:
        super().__init__(**kwargs)
        self.params = {cid: hparams(hp) for cid, hp in plan.items()}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        extra = self.params.get(trial.config.get("config_id"), {})
        # a copy: the other callbacks (Tune's own files) keep the result as it was
        super().log_trial_result(iteration, trial, {**result, "config": {**extra, **result.get("config", {})}})


def wandb_dir(spec: Spec) -> Path:
    """The folder W&B writes its ``wandb/`` folder into: ``tracking.wandb.dir``, else the output folder."""
    return Path(spec.tracking.wandb.dir).resolve() if spec.tracking.wandb.dir else spec.output_dir


def callbacks(spec: Spec, plan: dict[str, HParams]) -> list:
    """The Tune callbacks of the spec's trackers (none without ``tracking``)."""
    out: list = []
    if spec.tracking.mlflow is not None:
        m = spec.tracking.mlflow
        out.append(MLflowTrials(plan, tracking_uri=m.resolved_uri(spec.output_dir),
                                experiment_name=m.experiment or spec.name,
                                tags={OUTPUT_TAG: str(spec.output_dir), "covid_tune.sweep": spec.name}))
    if spec.tracking.wandb is not None:
        w = spec.tracking.wandb
        folder = wandb_dir(spec)
        folder.mkdir(parents=True, exist_ok=True)
        out.append(WandbTrials(plan, project=w.project, group=spec.name, mode=w.mode, dir=str(folder)))
    return out


def _test_metrics(model_dir: Path) -> dict[str, float]:
    """The chosen model's test numbers (the plain numbers of ``eval.json``'s test split, as ``test_<name>``)."""
    try:
        test = json.loads((model_dir / EVAL_FILE).read_text())["splits"]["test"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {f"test_{k}": float(v) for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _config_id(model_dir: Path) -> str:
    try:
        return json.loads((model_dir / MODEL_META).read_text())["config_id"]
    except (OSError, ValueError, KeyError):
        return model_dir.name


def log_mlflow_outcome(spec: Spec, plan: dict[str, HParams], report_dir: Path, model_dir: Path) -> str:
    """Log the report folder (``report/``) and the chosen model folder (``model/``) as artifacts of the
    MLflow run of the chosen configuration (the newest of this output folder's runs with its config id,
    tagged ``covid_tune.chosen``), with its test numbers as ``test_*`` metrics; where no such run exists
    (the trials ran without tracking), of a new run named ``<sweep>-chosen``. Returns the run's id."""
    from mlflow.tracking import MlflowClient

    m = spec.tracking.mlflow
    client = MlflowClient(tracking_uri=m.resolved_uri(spec.output_dir))
    name = m.experiment or spec.name
    experiment = client.get_experiment_by_name(name)
    exp_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    cid = _config_id(model_dir)
    runs = [r for r in client.search_runs([exp_id], filter_string=f"params.config_id = '{cid}'",
                                          order_by=["attributes.start_time DESC"])
            if r.data.tags.get(OUTPUT_TAG) == str(spec.output_dir)]
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=f"{spec.name}-chosen",
                                   tags={OUTPUT_TAG: str(spec.output_dir), "covid_tune.sweep": spec.name}).info.run_id
        for key, value in ({"config_id": cid, **hparams(plan[cid])} if cid in plan else {"config_id": cid}).items():
            client.log_param(run_id, key, value)
    client.set_tag(run_id, CHOSEN_TAG, "true")
    for key, value in _test_metrics(model_dir).items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(report_dir), artifact_path="report")
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    if not runs:
        client.set_terminated(run_id)
    return run_id


def log_wandb_outcome(spec: Spec, plan: dict[str, HParams], report_dir: Path, model_dir: Path) -> str:
    """A run ``<sweep>-chosen`` in the sweep's W&B group (W&B offline cannot add to a finished run): the
    chosen configuration's hyperparameters as config, its test numbers as summary, the chosen model
    (type ``model``) and the report folder (type ``report``) as artifacts. Returns the run's folder
    (offline) or id."""
    import wandb

    w = spec.tracking.wandb
    cid = _config_id(model_dir)
    run = wandb.init(project=w.project, group=spec.name, job_type="chosen", name=f"{spec.name}-chosen",
                     mode=w.mode, dir=str(wandb_dir(spec)),
                     config={"config_id": cid, **(hparams(plan[cid]) if cid in plan else {})})
    try:
        run.summary.update(_test_metrics(model_dir))
        model = wandb.Artifact(f"{spec.name}-chosen-model", type="model", metadata={"config_id": cid})
        model.add_dir(str(model_dir))
        run.log_artifact(model)
        report = wandb.Artifact(f"{spec.name}-report", type="report")
        report.add_dir(str(report_dir))
        run.log_artifact(report)
        where = str(Path(run.dir).parent) if w.mode == "offline" else run.id
    finally:
        run.finish()
    return where


def log_outcome(spec: Spec, plan: dict[str, HParams], report_dir: Path, model_dir: Path | None) -> list[str]:
    """Log the report and the chosen model to each tracker of the spec; one line per tracker saying where.
    A tracker that fails is named in a warning: the sweep's own files are complete without it."""
    lines = []
    if model_dir is None:
        return lines
    for name, configured, fn in (("mlflow", spec.tracking.mlflow, log_mlflow_outcome),
                                 ("wandb", spec.tracking.wandb, log_wandb_outcome)):
        if configured is None:
            continue
        try:
            where = fn(spec, plan, report_dir, model_dir)
            lines.append(f"{name}: report and chosen model {model_dir.name} logged ({where})")
        except Exception as exc:  # noqa: BLE001 - a tracker out of reach must not fail a finished sweep
            log.warning(f"tracking.{name}: could not log the report and the chosen model: {type(exc).__name__}: {exc}")
    return lines
