"""Issue 27, the output folder and what is checked before anything is written: a name or output that is the
working directory (case 1), two runs into one folder (6), a copied or moved folder's report (7), a full disk
(8), an address nothing answers at (9), an output that is a file or read-only (10), impossible resources
and a refused --resume (13). Each asserts the exit code, the message, no traceback, and the files on disk."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from covid_tune.cli import run
from covid_tune.cli.output_dir import LOCK, MARKER, OutputLock, record_experiment
from covid_tune.report.build import load_saved_spec, save_spec
from covid_tune.spec.load import validate
from covid_tune.spec.plan import expand
from covid_tune.sweep.resume_guard import record_experiment_state


def _main(capsys, *argv) -> tuple[int, str]:
    """``covid_tune.cli.run.main`` in this process (no Ray starts in these cases): exit code and stderr."""
    rc = run.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> content), to compare before and after; the lock file
    (holding the PID of the last run that took it) left out."""
    return {str(p.relative_to(folder)): p.read_text(errors="replace") for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK}


@pytest.fixture
def no_output(tiny_raw: dict) -> dict:
    """The tiny spec without ``output:`` (runs/<name> under the working directory)."""
    raw = copy.deepcopy(tiny_raw)
    raw.pop("output")
    return raw


# case 1: data loss through a name or output that is the working directory, a parent of it, / or home

def test_name_dotdot_is_refused_and_overwrite_deletes_nothing(tmp_path, monkeypatch, capsys, no_output) -> None:
    work = tmp_path / "work"
    spec = _write(work / "spec.yaml", no_output)
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = _main(capsys, spec, "--set", "name=..", *extra)
        assert rc == 2
        assert err.startswith("covid_tune: ") and "name: '..' cannot name" in err
        assert spec.is_file() and _tree(tmp_path) == before
    assert not (work / "runs").exists() and not list(tmp_path.rglob(LOCK))


@pytest.mark.parametrize("where", [".", "..", "/", "home", "home-parent"])
def test_output_that_is_cwd_a_parent_root_or_home_is_refused(where, tmp_path, monkeypatch, capsys, tiny_raw) -> None:
    home = tmp_path / "home" / "me"
    work = home / "work"
    spec = _write(work / "spec.yaml", tiny_raw)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    output = {"home": str(home), "home-parent": str(home.parent)}.get(where, where)
    before = _tree(tmp_path)
    rc, err = _main(capsys, spec, "--output", output, "--overwrite")
    assert rc == 2
    assert "a sweep needs a folder of its own" in err and str(Path(output).resolve()) in err
    assert _tree(tmp_path) == before


def _fake_sweep(out: Path, spec_raw: dict, marker: bool, saved_spec: bool = True) -> Path:
    """An output folder that looks like an earlier sweep's: Tune's experiment folder with a file in it."""
    spec = validate(spec_raw)
    experiment = Path(spec.experiment_path)
    experiment.mkdir(parents=True)
    (experiment / "experiment_state.json").write_text("{}")
    (out / "trials.json").write_text('{"a": {"status": "ok", "error": null}}')
    if saved_spec:
        save_spec(out, spec)
    if marker:
        record_experiment(spec)
        record_experiment_state(spec)  # as Tune's callback does: --resume finds the state it recorded
    return experiment


@pytest.mark.parametrize("saved_spec", [True, False], ids=["earlier-version", "not-covid_tune"])
def test_overwrite_refuses_an_experiment_the_marker_does_not_list(saved_spec, tmp_path, capsys, tiny_raw) -> None:
    out = Path(tiny_raw["output"])
    _fake_sweep(out, tiny_raw, marker=False, saved_spec=saved_spec)
    before = _tree(out)
    rc, err = _main(capsys, _write(tmp_path / "s.yaml", tiny_raw), "--overwrite")
    assert rc == 2
    assert f"has no {MARKER} marker file" in err and "nothing was deleted" in err and "by hand" in err
    assert ("earlier covid_tune version" in err) == saved_spec
    assert _tree(out) == before
    rc, err = _main(capsys, _write(tmp_path / "s.yaml", tiny_raw), "--overwrite", "--dry-run")
    assert rc == 2 and "nothing was deleted" in err


def test_overwrite_deletes_the_experiment_the_marker_lists(tmp_path, capsys, tiny_raw) -> None:
    """Only the experiment the marker lists, and only once the new run's data passed: a run refused for
    its data leaves the old sweep whole."""
    from covid_tune.cli.output_dir import check_output, clear_for_overwrite

    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"root": str(tmp_path / "no-data"), "image_size": 32}  # refused after the output checks
    out = Path(raw["output"])
    experiment = _fake_sweep(out, raw, marker=True)
    other = copy.deepcopy(raw)
    other["name"] = "other"  # the marker lists tiny's experiment only
    _fake_sweep_other = Path(validate(other).experiment_path)
    _fake_sweep_other.mkdir(parents=True)
    rc, err = _main(capsys, _write(tmp_path / "o.yaml", other), "--overwrite")
    assert rc == 2 and "does not list" in err and _fake_sweep_other.is_dir()
    before = _tree(out)
    rc, err = _main(capsys, _write(tmp_path / "s.yaml", raw), "--overwrite")
    assert rc == 2 and "data folder does not exist" in err and "--overwrite deleted nothing" in err
    assert _tree(out) == before and experiment.is_dir()
    # a run whose data and weights pass clears what check_output allowed, and nothing else
    spec = validate(raw)
    assert check_output(spec, expand(spec), resume=False, overwrite=True) is None
    clear_for_overwrite(spec)
    assert not experiment.exists() and not (out / "trials.json").exists()
    assert json.loads((out / MARKER).read_text())["experiments"] == [str(experiment)]
    assert _fake_sweep_other.is_dir()


# case 6: one sweep per output folder at a time

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_locked_output_is_refused_naming_the_pid(tmp_path, capsys, tiny_raw) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"root": str(tmp_path / "no-data"), "image_size": 32}
    out = Path(raw["output"])
    experiment = _fake_sweep(out, raw, marker=True)
    spec = _write(tmp_path / "s.yaml", raw)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(out)
        for extra in (["--overwrite"], ["--resume"]):  # the lock is taken before --overwrite deletes anything
            rc, err = _main(capsys, spec, *extra)
            assert rc == 2
            assert f"is in use by another covid_tune run (PID {holder.pid})" in err
            assert _tree(out) == before and experiment.is_dir()
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock, nothing stale stays behind
        holder.wait()
    rc, err = _main(capsys, spec, "--overwrite")
    assert rc == 2 and "in use" not in err and "data folder does not exist" in err  # past the lock, to the data
    assert "--overwrite deleted nothing" in err and experiment.is_dir()  # refused data: the old sweep stays
    lock = OutputLock(out)  # released when main returned
    assert lock.acquire() is None
    lock.release()


def test_a_refused_run_leaves_no_folder_behind(tmp_path, capsys, tiny_raw) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"root": str(tmp_path / "no-data"), "image_size": 32}
    raw["output"] = str(tmp_path / "runs" / "new")
    rc, err = _main(capsys, _write(tmp_path / "s.yaml", raw))
    assert rc == 2 and "data folder does not exist" in err
    assert not (tmp_path / "runs").exists()  # created for the lock, removed again with it


# case 7: the report of a copied or moved output folder reads that folder

def test_saved_spec_is_rebased_onto_the_folder_given(tmp_path, tiny_raw) -> None:
    raw = copy.deepcopy(tiny_raw)
    old, new = tmp_path / "old", tmp_path / "new"
    raw["output"] = str(old)
    raw["ray"] = {"storage_path": str(old / "tune")}
    spec = validate(raw)
    save_spec(old, spec)
    shutil.copytree(old, new)
    moved = load_saved_spec(new)
    assert moved.output_dir == new and moved.experiment_dir == new / "tune" / "tiny"
    raw2 = copy.deepcopy(raw)
    raw2["data"] = {"root": str(tmp_path / "data"), "image_size": 32}
    save_spec(new, validate(raw2))
    assert load_saved_spec(new).data.root == str(tmp_path / "data")  # data elsewhere is kept


# A sweep's folder copied and moved (the original gone) is rebuilt by `covid-tune report` from its own
# trials and data: tests/test_shortlist.py::test_a_sweep_beyond_top_k_reports_predicts_and_rebuilds.


# case 8: a disk smaller than the pre-flight estimate

def test_too_little_free_disk_is_refused_with_both_numbers(tmp_path, monkeypatch, capsys, tiny_raw) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    spec = _write(tmp_path / "s.yaml", tiny_raw)
    rc, err = _main(capsys, spec)
    assert rc == 2
    assert "not enough disk space" in err and "pre-flight estimate" in err and "has 1 KB free" in err
    assert not Path(tiny_raw["output"]).exists()
    rc, err = _main(capsys, spec, "--dry-run")
    assert rc == 2 and "not enough disk space" in err


# case 9: an address nothing answers at

@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:10001"])
def test_unreachable_address_exits_2_quickly_naming_it(address, tmp_path, capsys, tiny_raw) -> None:
    spec = _write(tmp_path / "s.yaml", tiny_raw)
    start = time.monotonic()
    rc, err = _main(capsys, spec, "--address", address)
    assert rc == 2 and f"--address {address}" in err
    assert time.monotonic() - start < 30
    assert not Path(tiny_raw["output"]).exists()
    rc, err = _main(capsys, spec, "--address", address, "--dry-run")
    assert rc == 2 and f"--address {address}" in err


# case 10: an output that is a file, or read-only

@pytest.mark.parametrize("inside", [False, True], ids=["output-is-a-file", "parent-is-a-file"])
def test_output_that_is_a_file_exits_2_also_in_dry_run(inside, tmp_path, capsys, tiny_raw) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    output = blocker / "out" if inside else blocker
    spec = _write(tmp_path / "s.yaml", tiny_raw)
    for extra in ([], ["--dry-run"]):
        rc, err = _main(capsys, spec, "--output", output, *extra)
        assert rc == 2
        assert (f"cannot be created: {blocker} is a file" if inside else f"{blocker} is a file") in err
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0500 folder: a read-only folder cannot be "
                                              "made here without mounting a read-only filesystem")
def test_read_only_output_exits_2_also_in_dry_run(tmp_path, capsys, tiny_raw) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        spec = _write(tmp_path / "s.yaml", tiny_raw)
        for extra in ([], ["--dry-run"]):
            rc, err = _main(capsys, spec, "--output", parent / "out", *extra)
            assert rc == 2 and "is not writable" in err
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


# case 13: impossible resources refused before spec.json and cache/; a refused --resume keeps trials.json

@pytest.mark.parametrize("setting", ["resources.cpus=64", "resources.gpu=1"])
def test_impossible_resources_are_refused_before_anything_is_written(setting, tmp_path, capsys, tiny_raw) -> None:
    import torch

    if setting.startswith("resources.gpu") and torch.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    rc, err = _main(capsys, _write(tmp_path / "s.yaml", tiny_raw), "--set", setting)
    assert rc == 2 and f"{setting} but this machine has" in err
    assert not Path(tiny_raw["output"]).exists()  # no spec.json, no cache/, no synthetic data


def test_a_refused_resume_keeps_trials_json(tmp_path, capsys, tiny_raw) -> None:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {"root": str(tmp_path / "no-data"), "image_size": 32}
    out = Path(raw["output"])
    _fake_sweep(out, raw, marker=True)
    spec = _write(tmp_path / "s.yaml", raw)
    before = (out / "trials.json").read_text()
    for extra, says in ((["--set", "grid.seed=[0,1]"], "the spec differs"),
                        (["--set", "resources.cpus=64"], "resources.cpus=64"),
                        ([], "data folder does not exist")):  # passes the output checks, refused after them
        rc, err = _main(capsys, spec, "--resume", *extra)
        assert rc == 2 and says in err
        assert (out / "trials.json").read_text() == before
