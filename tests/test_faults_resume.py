"""Issue 27, cases 2-5: an interrupted sweep is never reported as finished, a resume trains every epoch
exactly once whatever moment the driver died at, and --resume refuses Tune state or data that changed.

The sweeps run ``covid-tune run`` as a subprocess (its own session, local Ray). A driver killed
with SIGKILL leaves the Ray processes it started: the test records the driver's process tree first and
kills exactly those processes afterwards (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_here, shrink

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
ENV.pop("RAY_ADDRESS", None)


def _psutil():
    """psutil: installed, or the copy Ray ships in ray/thirdparty_files (Ray puts it on its own path)."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        sys.path.append(str(Path(importlib.util.find_spec("ray").origin).parent / "thirdparty_files"))
        import psutil
    return psutil


def sweep_spec(tmp_path: Path, epochs: int, train: int = 400, data_root: Path | None = None) -> Path:
    """Two tiny-CNN trials (two seeds), no ASHA, 32 px; ``train`` images set how long an epoch takes."""
    raw = shrink({"name": "faults", "grid": {"backbone": ["tiny_cnn"], "freeze": ["none"], "loss": ["ce"],
                                             "seed": [0, 1]},
                  "trainer": {"lr": 0.01}, "scheduler": {"metric": "val_loss"}}, tmp_path,
                 trainer={"epochs": epochs, "batch_size": 16, "head_hidden": 16, "weights": "none", "lr": 0.01},
                 scheduler={"asha": False, "grace_period": 1})
    if data_root is None:
        raw["data"]["synthetic"] = {"classes": ["infected", "normal"], "train": train, "validation": 10, "test": 10,
                                    "image_size": 36}
    else:
        raw["data"]["root"] = str(data_root)
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Driver:
    """The sweep's driver in its own session; ``kill`` also ends the Ray processes it started."""

    def __init__(self, spec: Path, *args: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "covid_tune", "run", str(spec), *args], cwd=REPO, env=ENV,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def tree(self) -> list:
        psutil = _psutil()

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the driver did not end in {timeout:.0f} s:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the driver, then every process of its tree recorded just before (Ray's own)."""
        psutil = _psutil()

        left = self.tree()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)


def rows(experiment: Path) -> dict[str, dict[str, list[int]]]:
    """Each configuration's epochs as result.json and progress.csv list them, in order."""
    import csv

    out = {}
    for params in experiment.glob("*/params.json"):
        try:
            cid = json.loads(params.read_text())["config_id"]
        except (json.JSONDecodeError, KeyError):
            continue
        result, progress = params.parent / "result.json", params.parent / "progress.csv"
        epochs = {"result": [], "progress": []}
        if result.is_file():
            for line in result.read_text().splitlines():
                try:
                    epochs["result"].append(int(json.loads(line)["epoch"]))
                except (json.JSONDecodeError, KeyError):
                    pass
        if progress.is_file():
            epochs["progress"] = [int(float(r["epoch"])) for r in csv.DictReader(progress.open()) if r.get("epoch")]
        out[cid] = epochs
    return out


def reported(experiment: Path) -> int:
    return sum(len(e["result"]) for e in rows(experiment).values())


def wait_until(condition, driver: Driver, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if driver.proc.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.proc.returncode}) before {what}:\n{driver.text()[-4000:]}")
        time.sleep(0.1)
    driver.kill()
    pytest.fail(f"timed out waiting for {what}:\n{driver.text()[-4000:]}")


def assert_each_epoch_once(experiment: Path, epochs: int | None = None) -> None:
    """No epoch twice, none skipped (up to ``epochs`` when given, else up to what was reported)."""
    for cid, e in rows(experiment).items():
        for kind in ("result", "progress"):
            want = list(range(1, (epochs if epochs is not None else len(e[kind])) + 1))
            assert e[kind] == want, (cid, kind, e[kind])


# --------------------------------------------------------------------------------------------
# case 2: SIGINT / SIGTERM


SIGNAL_EPOCHS = 8


def signal_sweep(tmp: Path, sig: int, data_root: Path | None = None) -> dict:
    """A sweep that ``sig`` cuts as soon as a trial reports: exit code, console, trials.json and
    REPORT.md (None where none was written) as the cut left them."""
    spec = sweep_spec(tmp, SIGNAL_EPOCHS, data_root=data_root)
    out = tmp / "out"
    experiment = out / "ray" / "faults"
    driver = Driver(spec, log=tmp / "run1.log")
    try:
        wait_until(lambda: any(experiment.glob("*/progress.csv")), driver, "a trial reporting")
        driver.proc.send_signal(sig)  # to the driver only, as `kill -INT PID` does
        code = driver.wait(180)
    finally:
        driver.kill()
    report = out / "report" / "REPORT.md"
    return {"spec": spec, "out": out, "experiment": experiment, "code": code, "text": driver.text(),
            "trials": json.loads((out / "trials.json").read_text()),
            "report": report.read_text() if report.exists() else None}


def assert_cut(cut_run: dict, sig: int) -> dict:
    """A sweep cut by ``sig`` exits 128+sig, says so, and is never reported as finished; its
    interrupted trials."""
    text = cut_run["text"]
    assert cut_run["code"] == 128 + sig, text[-4000:]
    assert "Traceback" not in text and "finished in" not in text and "stopped by ASHA" not in text
    assert f"interrupted by {signal.Signals(sig).name}" in text
    trials = cut_run["trials"]
    assert set(trials) == {"tiny_cnn-none-ce-s0", "tiny_cnn-none-ce-s1"}
    cut = {c: t for c, t in trials.items() if t["status"] == "interrupted"}
    assert cut and all(t["epochs"] < SIGNAL_EPOCHS and t["epochs_max"] == SIGNAL_EPOCHS for t in cut.values()), trials
    assert all(t["status"] in ("ok", "interrupted") for t in trials.values()), trials
    assert cut_run["report"] is None or cut_run["report"].startswith("INTERRUPTED")
    return cut


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """A sweep cut by SIGINT, its report rebuilt from the cut folder, resumed and cut by SIGTERM, then
    resumed to the end. It runs on an image folder (not synthetic: --set data.root applies), so the
    --resume refusals below (cases 4 and 5) use it as their finished sweep."""
    from covid_tune.data.synthetic import make_synthetic

    tmp = tmp_path_factory.mktemp("interrupted")
    data = make_synthetic(tmp / "data", ["infected", "normal"], {"train": 400, "validation": 10, "test": 10}, 36, 0)
    seen = signal_sweep(tmp, signal.SIGINT, data_root=data)
    out, spec = seen["out"], seen["spec"]
    report = out / "report" / "REPORT.md"
    seen["rebuild"] = subprocess.run([sys.executable, "-m", "covid_tune", "report", str(out)], cwd=REPO, env=ENV,
                                     capture_output=True, text=True, timeout=300)
    seen["rebuilt"] = report.read_text() if report.exists() else ""
    # resumed, then cut by SIGTERM as soon as it reports a new epoch (test_sigterm_...: one sweep for both)
    before = reported(seen["experiment"])
    term = Driver(spec, "--resume", log=tmp / "run2.log")
    try:
        wait_until(lambda: reported(seen["experiment"]) > before, term, "a new epoch reported after the resume")
        term.proc.send_signal(signal.SIGTERM)
        term_code = term.wait(180)
    finally:
        term.kill()
    seen["term"] = {"code": term_code, "text": term.text(),
                    "trials": json.loads((out / "trials.json").read_text()),
                    "report": report.read_text() if report.exists() else None}
    resumed = Driver(spec, "--resume", log=tmp / "run3.log")
    try:
        seen["resumed_code"] = resumed.wait()
    finally:
        resumed.kill()
    seen["resumed_text"] = resumed.text()
    seen["resumed_trials"] = json.loads((out / "trials.json").read_text())
    seen["rows"] = rows(seen["experiment"])
    seen["final"] = report.read_text()
    return seen


@pytest.mark.slow
def test_sigint_cuts_the_sweep_it_is_never_reported_as_finished_and_resumes(interrupted: dict) -> None:
    cut = assert_cut(interrupted, signal.SIGINT)

    # a report rebuilt from the cut sweep says so first, with each unfinished trial and why it has no value
    proc = interrupted["rebuild"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = interrupted["rebuilt"]
    assert md.startswith("INTERRUPTED: ")
    first = md.splitlines()[0]
    for cid in cut:
        assert f"`{cid}` (interrupted at epoch " in first or f"`{cid}` (not started)" in first, first
    assert "stopped early by ASHA" not in md.split("## Accuracy")[0]

    assert interrupted["resumed_code"] == 0, interrupted["resumed_text"][-4000:]
    assert "Traceback" not in interrupted["resumed_text"]
    assert all(t["status"] == "ok" for t in interrupted["resumed_trials"].values())
    for cid, e in interrupted["rows"].items():  # as assert_each_epoch_once, on the rows read right after the resume
        for kind in ("result", "progress"):
            assert e[kind] == list(range(1, SIGNAL_EPOCHS + 1)), (cid, kind, e[kind])
    assert len(interrupted["rows"]) == 2
    md = interrupted["final"]
    assert md.startswith("# faults") and "INTERRUPTED" not in md


@pytest.mark.slow
def test_sigterm_cuts_the_sweep_it_is_never_reported_as_finished(interrupted: dict) -> None:
    """The SIGINT-cut sweep, resumed and cut again by SIGTERM (after its first new epoch); the
    resume after that one is the SIGINT test's."""
    assert_cut(interrupted["term"], signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# case 3: SIGKILL of the driver at several moments, then --resume


@pytest.mark.slow
def test_resume_after_kills_at_many_moments_trains_every_epoch_once(tmp_path: Path) -> None:
    epochs = 10
    spec = sweep_spec(tmp_path, epochs)
    out = tmp_path / "out"
    experiment = out / "ray" / "faults"
    finished = False
    # two kills, each a driver start (~15 s): the first driver mid-run, 1.6 s after an epoch reported
    # (Tune's state saved, the next epoch under way); the resumed driver the moment its first new epoch
    # is reported (the restored trials' first report, before Tune's next state save). A first driver
    # killed the moment an epoch is reported is test_search's optuna kill; a killed driver whose Tune
    # snapshot lags its last reported epoch, test_cluster's.
    for i, delay in enumerate((1.6, 0.0)):
        before = reported(experiment)
        driver = Driver(spec, *(["--resume"] if i else []), log=tmp_path / f"run{i}.log")
        try:
            # a new epoch reported in this run, then the kill `delay` seconds later
            wait_until(lambda before=before, driver=driver: reported(experiment) > before or driver.proc.poll() == 0,
                       driver, "an epoch reported")
            time.sleep(delay)
        finally:
            driver.kill()
        assert "Traceback" not in driver.text(), driver.text()[-4000:]
        if driver.proc.returncode == 0:
            finished = True
            break
        assert driver.proc.returncode == -signal.SIGKILL
        assert_each_epoch_once(experiment)  # between kills too: no epoch twice, none skipped
    if not finished:
        last = Driver(spec, "--resume", log=tmp_path / "last.log")
        try:
            assert last.wait() == 0, last.text()[-4000:]
        finally:
            last.kill()
        assert "stopped early" not in last.text() and "epoch 0/" not in last.text(), last.text()[-3000:]
    assert_each_epoch_once(experiment, epochs)
    assert all(t["status"] == "ok" for t in json.loads((out / "trials.json").read_text()).values())
    assert (out / "report" / "REPORT.md").read_text().startswith("# faults")
    assert_finished_footprint(out, experiment)


def assert_finished_footprint(out: Path, experiment: Path) -> None:
    """Each finished trial holds one checkpoint folder, no optimizer state in it, and the epoch picked
    over its whole history (the kills notwithstanding): best/ exported that epoch, and holds its weights
    alone (the trial's files keep their epochs, no weights: engine.checkpoints.released)."""
    import torch

    from covid_tune.results.selection import pick_epoch

    for params in experiment.glob("*/params.json"):
        cid = json.loads(params.read_text())["config_id"]
        folders = sorted(params.parent.glob("checkpoint_*"))
        assert len(folders) == 1, (cid, folders)
        state = torch.load(folders[0] / "state.pt", weights_only=True)
        assert "optimizer" not in state and "torch_rng" not in state, (cid, sorted(state))
        history = [json.loads(line) for line in (params.parent / "result.json").read_text().splitlines()]
        want = pick_epoch(history, "val_loss", "min")
        assert json.loads((out / "best" / cid / "model.json").read_text())["epoch"] == want, cid
        held = {state["epoch"]}
        files = [state]
        if (folders[0] / "selected.pt").is_file():
            files.append(torch.load(folders[0] / "selected.pt", weights_only=True))
            held.add(files[-1]["epoch"])
        assert want in held and len(held) == len(list(folders[0].glob("*.pt"))), (cid, held)
        assert all(f.get("exported") and "model" not in f for f in files), cid
        assert (out / "best" / cid / "model.pt").is_file()


# --------------------------------------------------------------------------------------------
# cases 4 and 5: --resume refuses Tune state or data that changed (checked before Ray starts)


@pytest.fixture
def finished(interrupted: dict, monkeypatch) -> Path:
    """The finished sweep of :func:`interrupted` (on an image folder: --set data.root applies); its spec."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the refusals come before Ray, but would join one named here
    assert interrupted["resumed_code"] == 0, interrupted["resumed_text"][-4000:]
    return interrupted["spec"]


def resume(capsys, spec: Path, *args: str) -> subprocess.CompletedProcess:
    """``covid-tune run SPEC --resume ARGS`` in this process (each case is refused before Ray starts)."""
    return cli_here(capsys, "run", spec, "--resume", *args)


class _Touch:
    """Unpickling it creates ``path``: a stand-in for code an attacker plants in tuner.pkl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_a_tampered_tuner_pickle_is_refused_and_never_loaded(finished: Path, tmp_path: Path, capsys) -> None:
    out = finished.parent / "out"
    tuner = out / "ray" / "faults" / "tuner.pkl"
    marker = tmp_path / "pwned"
    saved = tuner.read_bytes()
    spec_json = (out / "spec.json").read_bytes()
    tuner.write_bytes(pickle.dumps(_Touch(marker)))
    try:
        proc = resume(capsys, finished)
    finally:
        tuner.write_bytes(saved)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"covid_tune: --resume: {tuner} changed since covid_tune last wrote this sweep")
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # the pickle was never loaded
    assert (out / "spec.json").read_bytes() == spec_json and (out / "trials.json").is_file()


@pytest.mark.slow
def test_tune_state_without_covid_tunes_record_is_refused(finished: Path, capsys) -> None:
    out = finished.parent / "out"
    record = out / "state-digest.json"
    saved = record.read_bytes()
    record.unlink()
    try:
        proc = resume(capsys, finished)
    finally:
        record.write_bytes(saved)
    assert proc.returncode == 2 and proc.stderr.startswith(f"covid_tune: --resume: {record} is missing"), proc.stderr
    # an extra file Tune's restore would read (a planted searcher state) is refused by name
    planted = out / "ray" / "faults" / "searcher-state-x.pkl"
    planted.write_bytes(b"x")
    try:
        proc = resume(capsys, finished)
    finally:
        planted.unlink()
    assert proc.returncode == 2 and f"{planted} was not written by covid_tune's run" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_resume_with_other_data_is_refused(finished: Path, tmp_path: Path, capsys) -> None:
    from covid_tune.data.synthetic import make_synthetic

    out = finished.parent / "out"
    data = finished.parent / "data"
    spec_json = (out / "spec.json").read_bytes()
    other = make_synthetic(tmp_path / "other", ["covid", "normal", "pneumonia"],
                           {"train": 6, "validation": 3, "test": 3}, 36, 1)
    proc = resume(capsys, finished, "--set", f"data.root={other}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("covid_tune: --resume: the data differ") and f"-> '{other}'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    # the same root with other files in it
    extra = data / "train" / "infected" / "extra.png"
    shutil.copy(next((data / "test" / "normal").iterdir()), extra)
    try:
        proc = resume(capsys, finished)
    finally:
        extra.unlink()
    assert proc.returncode == 2 and f"the files under {data.resolve()}" in proc.stderr, proc.stderr
    assert (out / "spec.json").read_bytes() == spec_json  # nothing rewritten


# --------------------------------------------------------------------------------------------
# the pieces, without Ray


def test_rows_after_the_restored_checkpoint_are_dropped() -> None:
    from covid_tune.sweep.ray_internals import keep_rows_upto

    lines = "".join(json.dumps({"epoch": e, "training_iteration": e}) + "\n" for e in (1, 2, 3, 4))
    assert keep_rows_upto(lines, 2, csv_header=False) == "".join(lines.splitlines(True)[:2])
    assert keep_rows_upto(lines, 4, csv_header=False) is None  # nothing after it: left as it is
    assert keep_rows_upto(lines + '{"epoch": 5, "tr', 4, csv_header=False) == lines  # a line cut off by a kill
    csv_text = "epoch,val_loss\n1,0.5\n2,0.4\n3,0.3\n"
    assert keep_rows_upto(csv_text, 1, csv_header=True) == "epoch,val_loss\n1,0.5\n"
    assert keep_rows_upto(csv_text, 0, csv_header=True) == "epoch,val_loss\n"


def test_without_asha_no_trial_is_said_to_be_stopped_by_asha() -> None:
    import io

    from covid_tune.cli.console import SweepConsole

    stream = io.StringIO()
    console = SweepConsole(total=2, max_epochs=8, metric="val_loss", mode="min", rungs=[4], asha=False, stream=stream)
    console.started("a")
    console.result("a", 4, 0.5)
    console.completed("a")
    console.completed("b", epoch=8)  # a restored trial that had reported its last epoch: no new result here
    text = stream.getvalue()
    assert "ASHA" not in text and "ended before its last epoch" in text
    assert "done  b  epoch 8/8" in text and "epoch 0/8" not in text


def test_a_dash_in_the_report_says_why() -> None:
    from covid_tune.report.sections import interrupted_banner, missing

    assert missing({"status": "error"}) == "- (failed)"
    assert missing({"status": "interrupted", "epochs_trained": 4, "epochs_max": 10}) == \
        "- (interrupted at epoch 4/10)"
    assert missing({"status": "interrupted", "epochs_trained": 0, "epochs_max": 10}) == "- (not started)"
    assert missing({"status": "ok", "epochs_trained": 10, "epochs_max": 10}) == "- (not evaluated)"
    rows = [{"config_id": "a", "status": "ok"},
            {"config_id": "b", "status": "interrupted", "epochs_trained": 3, "epochs_max": 6}]
    assert interrupted_banner(rows)[0].startswith("INTERRUPTED: 1 of 2 configuration(s) did not finish: "
                                                  "`b` (interrupted at epoch 3/6)")
    assert interrupted_banner(rows[:1]) == []


def test_trials_cut_by_a_signal_are_interrupted_not_ok() -> None:
    from types import SimpleNamespace

    from covid_tune.sweep.tuning import trial_outcomes

    plan = {c: SimpleNamespace(epochs=6) for c in ("done", "cut", "pending", "failed")}
    grid = [SimpleNamespace(config={"config_id": "done"}, metrics={"epoch": 6}, error=None),
            SimpleNamespace(config={"config_id": "cut"}, metrics={"epoch": 3}, error=None),
            SimpleNamespace(config=None, metrics={}, error=None),  # a pending trial: Tune has no config for it
            SimpleNamespace(config={"config_id": "failed"}, metrics={"epoch": 2}, error=RuntimeError("boom\nmore"))]
    got = trial_outcomes(plan, grid, {"done": "ok"}, interrupted=True)
    assert {c: t["status"] for c, t in got.items()} == {"done": "ok", "cut": "interrupted", "pending": "interrupted",
                                                        "failed": "error"}
    assert got["cut"]["epochs"] == 3 and got["pending"]["epochs"] == 0 and got["failed"]["error"] == "boom"
    # no signal: a trial that reported its last epoch is ok even if Tune's callback was not seen
    assert trial_outcomes(plan, grid[:1], {}, interrupted=False)["done"]["status"] == "ok"


def test_a_state_file_saved_after_its_last_record_is_replaced_by_the_recorded_copy(tmp_path: Path, tiny_raw) -> None:
    """A driver killed between Tune's save of its experiment state and covid_tune's record of it: --resume
    goes on from the recorded copy (never reading the unrecorded file); a changed tuner.pkl still stops it."""
    from covid_tune.spec.load import validate
    from covid_tune.sweep import resume_guard

    spec = validate(tiny_raw)
    exp = spec.experiment_dir
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"tuner")
    state = exp / "experiment_state-2026.json"
    state.write_bytes(b'{"saved": 1}')
    resume_guard.record_experiment_state(spec)
    state.write_bytes(b'{"saved": 2}')  # Tune's next save; the driver died before its record
    assert resume_guard.check_state(spec) is None
    assert state.read_bytes() == b'{"saved": 1}'
    (exp / "tuner.pkl").write_bytes(b"other")  # written once and recorded at once: no copy stands in
    assert "tuner.pkl changed since covid_tune last wrote this sweep" in resume_guard.check_state(spec)
    resume_guard.clear_record(spec.output_dir)  # a new sweep: nothing recorded, nothing to stand in
    (exp / "tuner.pkl").write_bytes(b"tuner")
    assert "is missing or unreadable" in resume_guard.check_state(spec)
