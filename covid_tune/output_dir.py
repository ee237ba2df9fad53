"""The sweep's output folder and Tune's experiment storage: never mix two sweeps in one, clear it for
--overwrite, check a --resume against the spec the sweep started with."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from covid_tune.spec import Spec


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
    """Refuse to mix two sweeps in one output/storage folder; clear it for --overwrite.

    Returns why the run must stop, or None. --resume needs the same plan the sweep started with
    (Tune restores its own copy of the grid); without --resume or --overwrite an existing sweep
    is never touched.
    """
    from covid_tune import plan as plan_mod
    from covid_tune import report as report_mod
    from covid_tune.spec import SpecError

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
            return (f"--resume: the spec differs from the one {out} was started with ({out / report_mod.SPEC_FILE}): "
                    "the trial grid or training settings changed. Resume with the same spec and --set "
                    "options, or pass --overwrite to start again")
        problem = resume_unchanged(spec)
        if problem:
            return problem
        (out / "trials.json").unlink(missing_ok=True)  # written again when the restored sweep ends
        return None
    if exists:
        if not overwrite:
            return (f"{spec.experiment_path} already holds a sweep named {spec.name!r}; "
                    "pass --resume to finish it or --overwrite to start again")
        delete_experiment(spec)
        for sub in ("best", "report"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "trials.json").unlink(missing_ok=True)
    return None


def resume_unchanged(spec: Spec) -> str | None:
    """Why --resume must stop: Tune's state files (unpickled on restore) or the data are not those
    covid_tune recorded (:mod:`covid_tune.resume_guard`); None when both are."""
    from covid_tune import report as report_mod
    from covid_tune import resume_guard

    return resume_guard.check_state(spec) or resume_guard.check_data(spec, report_mod.dataset_root(spec))
