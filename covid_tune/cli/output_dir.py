"""The sweep's output folder and Tune's experiment storage: never mix two sweeps in one, clear it for
--overwrite, check a --resume against the spec the sweep started with.

The folder is refused where it would be the working directory, a parent of it, ``/`` or the home folder,
a file, or not writable (:func:`location_problem`); one sweep at a time holds it (:class:`OutputLock`,
an OS lock that dies with its process); ``--overwrite`` deletes only an experiment that covid_tune's
marker file ``OUTPUT/.covid_tune`` lists as its own (:func:`record_experiment`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from covid_tune.engine.files import SPEC_FILE, write_atomic

if TYPE_CHECKING:
    from covid_tune.spec.load import Spec


def experiment_exists(spec: Spec) -> bool:
    """Whether Tune's experiment folder (a local/shared folder or a storage URI) already exists."""
    if not spec.remote_storage:
        return spec.experiment_dir.exists()
    import pyarrow.fs  # comes with ray[tune]; s3://, gs://, file:// alike

    fs, path = pyarrow.fs.FileSystem.from_uri(spec.experiment_path)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def delete_experiment(spec: Spec) -> None:
    """Remove Tune's experiment folder (or storage URI), and its local copy."""
    if spec.remote_storage:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(spec.experiment_path)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)
    shutil.rmtree(spec.experiment_dir, ignore_errors=True)  # the folder, or the local download of a URI


def check_output(spec: Spec, plan: dict, resume: bool, overwrite: bool) -> str | None:
    """Refuse to mix two sweeps in one output/storage folder. With --overwrite, whether the existing sweep
    may be deleted; :func:`clear_for_overwrite` deletes it, once the new run's data and weights are checked.

    Returns why the run must stop, or None. --resume needs the same plan the sweep started with
    (Tune restores its own copy of the grid); without --resume or --overwrite an existing sweep
    is never touched.
    """
    from covid_tune.report import build as report_mod
    from covid_tune.spec import plan as plan_mod
    from covid_tune.spec.load import SpecError

    out = spec.output_dir
    exists = experiment_exists(spec)
    if resume:
        if not exists:
            return f"--resume: no sweep named {spec.name!r} to restore at {spec.experiment_path}"
        try:
            before = report_mod.load_saved_spec(out)
        except (SpecError, ValueError, OSError):
            before = None
        if before is not None and plan_mod.expand(before) != plan:
            return (f"--resume: the spec differs from the one {out} was started with ({out / SPEC_FILE}): "
                    "the trial grid or training settings changed. Resume with the same spec and --set "
                    "options, or pass --overwrite to start again")
        problem = resume_unchanged(spec)
        if problem:
            return problem
        # trials.json stays until the restored sweep really starts (tuning.run_sweep): a refused
        # --resume leaves the folder as it was
        return None
    if exists:
        if not overwrite:
            return (f"{spec.experiment_path} already holds a sweep named {spec.name!r}; "
                    "pass --resume to finish it or --overwrite to start again")
        return overwrite_problem(spec)
    return None


def clear_for_overwrite(spec: Spec) -> None:
    """Delete the sweep --overwrite replaces (its experiment, best/, report/, trials.json; call after
    :func:`check_output` allowed it): only once the new run's data and weights passed, so a run refused
    for them leaves the old sweep whole."""
    out = spec.output_dir
    if not experiment_exists(spec):
        return
    delete_experiment(spec)
    for sub in ("best", "report"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "trials.json").unlink(missing_ok=True)


MARKER = ".covid_tune"  # JSON: the experiments covid_tune created for this output folder
LOCK = ".covid_tune.lock"  # holds the running sweep's PID; locked (flock) while it runs


def read_marker(out: Path) -> dict | None:
    """The marker file of an output folder, or None where there is none (or it is not covid_tune's)."""
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "covid_tune" or not isinstance(data.get("experiments"), list):
        return None
    return data


def record_experiment(spec: Spec) -> None:
    """Write in ``OUTPUT/.covid_tune`` that covid_tune creates the experiment ``spec.experiment_path``
    (call just before it does): the proof --overwrite asks for before it deletes anything."""
    from covid_tune import __version__

    out = spec.output_dir
    data = read_marker(out) or {"tool": "covid_tune", "experiments": []}
    data["version"] = __version__
    if spec.experiment_path not in data["experiments"]:
        data["experiments"].append(spec.experiment_path)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MARKER, json.dumps(data, indent=1))


def overwrite_problem(spec: Spec) -> str | None:
    """Why --overwrite must not delete the existing experiment: the output folder's marker file does
    not list it as covid_tune's (a folder of an earlier version, or someone else's). None: it may."""
    out = spec.output_dir
    marker = read_marker(out)
    if marker is not None and spec.experiment_path in marker["experiments"]:
        return None

    if marker is None and (out / SPEC_FILE).is_file():
        why = (f"{out} has no {MARKER} marker file (it was written by an earlier covid_tune version), so "
               f"covid_tune cannot tell that it made {spec.experiment_path}")
    elif marker is None:
        why = f"{out} has no {MARKER} marker file, so {spec.experiment_path} was not made by covid_tune"
    else:
        why = f"{out / MARKER} does not list {spec.experiment_path} as made by covid_tune"
    return (f"--overwrite: {why}; nothing was deleted. Delete {spec.experiment_path} by hand to start again, "
            "or choose another output folder (--output)")


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (where a mkdir of ``path`` would start)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def not_writable(folder: Path) -> str | None:
    """Why this user cannot create files in ``folder``, or None. Tried with a probe file: ``os.access``
    says yes to root even on a read-only file system."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".covid_tune-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def location_problem(spec: Spec) -> str | None:
    """Why the output folder (and a local ``ray.storage_path``) cannot hold a sweep, or None.

    Refused: the working directory, a parent of it, ``/`` or the home folder (or a parent of it): a
    sweep's output is a folder of its own, which --overwrite may clear; a file where the folder or one
    of its parents should be; a folder this user cannot create files in (tried with a probe file,
    which also holds for root on a read-only filesystem)."""
    out = spec.output_dir
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    what = ("the root folder /" if out == Path(out.anchor) else "the working directory" if out == cwd
            else "the home folder" if out == home else "a parent of the working directory" if cwd.is_relative_to(out)
            else "a parent of the home folder" if home.is_relative_to(out) else None)
    if what:
        return (f"output folder {out} is {what}: a sweep needs a folder of its own (its --overwrite deletes "
                f"what the sweep wrote there); set output: or --output to a new folder, e.g. runs/{spec.name}")
    folders = [("output folder", out)]
    if spec.ray.storage_path and not spec.remote_storage:
        folders.append(("ray.storage_path", Path(spec.storage_root)))
    for key, folder in folders:
        existing = nearest_existing(folder)
        if not existing.is_dir():
            shown = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
            return f"{key} {folder} {shown}; choose a folder (--output DIR)"
        why = not_writable(existing)
        if why:
            return (f"{key} {folder} is not writable ({existing}: {why}); "
                    "choose a folder you can write to (--output DIR)")
    return None


class OutputLock:
    """One sweep per output folder: an exclusive ``flock`` on ``OUTPUT/.covid_tune.lock`` held for the
    whole run (the file holds the holder's PID). The OS drops the lock when the process ends, however
    it ends, so a killed run leaves no stale lock. Folders created only to hold the lock are removed
    again on :meth:`release` when the run wrote nothing else into them (a refused run leaves no trace).
    """

    def __init__(self, out: Path) -> None:
        self.out, self.fd = out, None
        self.created: list[Path] = []

    def acquire(self) -> str | None:
        """Take the lock (creating the folder if needed); return why not (another run holds it), or None."""
        import fcntl

        missing = []
        path = self.out
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = missing  # deepest first
        lock = self.out / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self.created = []  # the folder is the other run's now: leave it alone
                return (f"output folder {self.out} is in use by another covid_tune run (PID {holder}); wait for "
                        "it to end or stop it, or choose another output folder (--output)")
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed by a run releasing it meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        """Drop the lock; remove the folders :meth:`acquire` created if they hold nothing of a sweep."""
        for folder in self.created:
            try:
                leftover = {p.name for p in folder.iterdir()}
            except OSError:
                break
            if folder == self.out:
                if leftover - {LOCK, MARKER}:
                    break
                for name in leftover:
                    (folder / name).unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []
        if self.fd is not None:
            # a run waiting on this file locks a new one when it is gone (acquire's inode check)
            (self.out / LOCK).unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
def resume_unchanged(spec: Spec) -> str | None:
    """Why --resume must stop: Tune's state files (unpickled on restore) or the data are not those
    covid_tune recorded (:mod:`covid_tune.sweep.resume_guard`); None when both are."""
    from covid_tune.report import build as report_mod
    from covid_tune.sweep import resume_guard

    return resume_guard.check_state(spec) or resume_guard.check_data(spec, report_mod.dataset_root(spec))
