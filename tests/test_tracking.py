"""Tracking (``tracking`` in the spec): MLflow and W&B through Ray's logger callbacks, the chosen model and
the report logged at the end, a missing package refused before Ray starts. Everything local: an MLflow
file store in tmp_path, W&B offline, no network."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from covid_tune.cli import preflight
from covid_tune.cli import run as run_mod
from covid_tune.engine.hparams import HParams
from covid_tune.spec.load import SpecError, validate


def test_tracking_keys_are_validated(tiny_raw: dict) -> None:
    with pytest.raises(SpecError) as err:
        validate({**tiny_raw, "tracking": {"mlflow": {"url": "x"}, "wandb": {"project": "p", "mode": "cloud"},
                                           "neptune": {}}})
    text = str(err.value)
    assert "tracking.mlflow.url: unknown key (allowed: uri, experiment)" in text
    assert "tracking.wandb.mode" in text and "'offline' or 'online'" in text
    assert "tracking.neptune: unknown key (allowed: mlflow, wandb)" in text
    with pytest.raises(SpecError, match="tracking.wandb.project: required key is missing"):
        validate({**tiny_raw, "tracking": {"wandb": {"mode": "offline"}}})


def test_the_mlflow_uri_a_bare_path_and_the_default(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = Path(tiny_raw["output"])
    assert validate({**tiny_raw, "tracking": {"mlflow": {}}}).tracking.mlflow.resolved_uri(out) == \
        (out / "mlruns").as_uri()
    assert validate({**tiny_raw, "tracking": {"mlflow": {"uri": "store"}}}).tracking.mlflow.resolved_uri(out) == \
        (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert validate({**tiny_raw, "tracking": {"mlflow": {}}}).tracking.mlflow.resolved_uri(out) == \
        "http://127.0.0.1:5000"


@pytest.mark.parametrize("dry", [False, True])
def test_a_missing_tracker_package_is_exit_2_before_anything_starts(tiny_raw: dict, tmp_path: Path, capsys,
                                                                   monkeypatch, dry: bool) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "wandb") else real(name, *a))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**tiny_raw, "tracking": {"mlflow": {}, "wandb": {"project": "p"}}}))
    rc = run_mod.main([str(path)] + (["--dry-run"] if dry else []))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "tracking.mlflow needs the mlflow package, not installed here: pip install 'covid_tune[mlflow]'" in err
    assert "tracking.wandb needs the wandb package, not installed here: pip install 'covid_tune[wandb]'" in err
    assert not Path(tiny_raw["output"]).exists()  # no Ray started, nothing written


def test_a_database_store_needs_the_full_mlflow(tiny_raw: dict, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    pytest.importorskip("mlflow")
    spec = validate({**tiny_raw, "tracking": {"mlflow": {"uri": "sqlite:///x.db"}}})
    assert ["full mlflow package" in p for p in preflight.tracking_problems(spec)] == [True]


class FakeTrial:
    """What Ray's logger callbacks read of a trial."""

    def __init__(self, config: dict, name: str, path: Path) -> None:
        self.config, self.name, self.local_path, self.trial_id = config, name, str(path), name

    def __str__(self) -> str:
        return self.name


def chosen_folders(tmp_path: Path, cid: str) -> tuple[Path, Path]:
    """A report folder and an exported model folder as the sweep leaves them (small stand-ins)."""
    report = tmp_path / "out" / "report"
    (report / "figures").mkdir(parents=True)
    (report / "REPORT.md").write_text("# report\n")
    (report / "figures" / "a.png").write_bytes(b"png")
    model = tmp_path / "out" / "best" / cid
    model.mkdir(parents=True)
    (model / "model.pt").write_bytes(b"weights")
    (model / "model.json").write_text(json.dumps({"config_id": cid}))
    (model / "eval.json").write_text(json.dumps({"splits": {"test": {"acc": 0.75, "loss": 0.5, "y": [0, 1]}}}))
    return report, model


def test_mlflow_file_store_has_the_params_metrics_and_artifacts(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    """Ray's callback as Tune drives it (start, a result per epoch, end), then the chosen model and the
    report: parsed back with MLflow's client."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from covid_tune.spec import plan as plan_mod
    from covid_tune.sweep import tracking

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    spec = validate({**tiny_raw, "trainer": {**tiny_raw["trainer"], "momentum": 0.8},
                     "tracking": {"mlflow": {"uri": uri, "experiment": "exp"}}})
    plan = plan_mod.expand(spec)
    [callback] = tracking.callbacks(spec, plan)
    callback.setup()
    trials = {cid: FakeTrial(params, f"train_trial_{i:05d}", tmp_path)
              for i, (cid, params) in enumerate(plan_mod.tune_params(spec, plan).items())}
    for trial in trials.values():
        callback.log_trial_start(trial)
        for epoch, loss in ((1, 0.7), (2, 0.4)):
            callback.log_trial_result(epoch, trial, {"training_iteration": epoch, "epoch": epoch, "val_loss": loss,
                                                     "node_id": "abc"})
        callback.log_trial_end(trial)
    cid = list(plan)[1]
    report, model = chosen_folders(tmp_path, cid)
    run_id = tracking.log_mlflow_outcome(spec, plan, report, model)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("exp")
    runs = {r.data.params["config_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(plan)
    for c, r in runs.items():
        hp: HParams = plan[c]
        assert r.data.params["momentum"] == "0.8" and r.data.params["freeze"] == hp.freeze
        assert r.data.params["batch_size"] == str(hp.batch_size) and r.data.params["epochs"] == "2"
        assert r.data.tags[tracking.OUTPUT_TAG] == str(spec.output_dir) and r.info.status == "FINISHED"
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.4)]
    assert runs[cid].info.run_id == run_id and runs[cid].data.tags[tracking.CHOSEN_TAG] == "true"
    assert runs[cid].data.metrics["test_acc"] == 0.75 and "test_y" not in runs[cid].data.metrics
    assert tracking.CHOSEN_TAG not in runs[list(plan)[0]].data.tags
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "back")))
    assert (local / "report" / "REPORT.md").read_text() == "# report\n"
    assert (local / "report" / "figures" / "a.png").is_file()
    assert (local / "model" / "model.pt").read_bytes() == b"weights"


def wandb_records(path: Path):
    """The records of a W&B ``.wandb`` file (W&B's log format: 32 KiB blocks of checksummed chunks, each
    record a protobuf ``Record``); wandb itself no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_run(folder: Path) -> dict:
    """A W&B offline run folder read back: its config, history rows and artifacts (name -> files)."""
    config, history, artifacts, summary = {}, [], {}, {}
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "artifact":
            artifacts[record.artifact.name] = sorted(m.path for m in record.artifact.manifest.contents)
    return {"config": config, "history": history, "artifacts": artifacts, "summary": summary}


def test_wandb_offline_writes_the_chosen_run_with_its_params(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from covid_tune.spec import plan as plan_mod
    from covid_tune.sweep import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = validate({**tiny_raw, "tracking": {"wandb": {"project": "p", "dir": str(tmp_path / "w")}}})
    plan = plan_mod.expand(spec)
    cid = list(plan)[0]
    report, model = chosen_folders(tmp_path, cid)
    folder = Path(tracking.log_wandb_outcome(spec, plan, report, model))
    assert folder.parent == tmp_path / "w" / "wandb" and folder.name.startswith("offline-run-")
    run = wandb_run(folder)
    deadline = time.monotonic() + 30
    while "config_id" not in run["config"] and time.monotonic() < deadline:
        time.sleep(0.5)  # W&B's service process may still be writing the run file (seen once in CI under load)
        run = wandb_run(folder)
    assert run["config"]["config_id"] == cid and run["config"]["lr"] == plan[cid].lr
    assert run["config"]["freeze"] == plan[cid].freeze and run["summary"]["test_acc"] == 0.75
    assert run["artifacts"] == {"tiny-chosen-model": ["eval.json", "model.json", "model.pt"],
                                "tiny-report": ["REPORT.md", "figures/a.png"]}


@pytest.mark.slow
def test_a_sweep_logs_every_trial_and_the_chosen_model(tiny_raw: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    """End to end: two tiny trials logged by Ray's callbacks to an MLflow file store and W&B offline, then
    REPORT.md and the chosen model (the one predict picks)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from covid_tune.cli.predict import best_model_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    raw = {**tiny_raw, "tracking": {"mlflow": {"uri": uri}, "wandb": {"project": "p", "mode": "offline"}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_mod.main([str(path)]) == 0
    err = capsys.readouterr().err
    out = Path(raw["output"])
    chosen = best_model_dir(out)
    assert f"mlflow: report and chosen model {chosen.name} logged" in err
    trials = json.loads((out / "trials.json").read_text())

    client = MlflowClient(tracking_uri=uri)
    runs = {r.data.params["config_id"]: r for r in
            client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    assert sorted(runs) == sorted(trials)
    for cid, r in runs.items():
        assert r.data.params["lr"] == "0.01" and r.data.params["batch_size"] == "16"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
        assert steps == list(range(1, trials[cid]["epochs"] + 1))
    assert runs[chosen.name].data.tags["covid_tune.chosen"] == "true"
    arts = {a.path for a in client.list_artifacts(runs[chosen.name].info.run_id, "model")}
    assert {"model/model.pt", "model/model.json"} <= arts
    assert "report/REPORT.md" in {a.path for a in client.list_artifacts(runs[chosen.name].info.run_id, "report")}

    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == len(trials) + 1
    read = [wandb_run(f) for f in folders]
    per_trial = {r["config"].get("config_id"): r for r in read if not r["artifacts"]}
    assert sorted(per_trial) == sorted(trials)
    for r in per_trial.values():
        assert r["config"]["momentum"] == 0.9 and r["config"]["head_hidden"] == 16  # not only the grid's axes
        assert [h["val_loss"] for h in r["history"] if "val_loss" in h]
    [final] = [r for r in read if r["artifacts"]]
    assert final["config"]["config_id"] == chosen.name and "model.pt" in final["artifacts"]["tiny-chosen-model"]
