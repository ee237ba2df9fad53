"""The one module that names Ray's private API: resume repair, a restored Tuner's run config, worker logs.

Tune restores a trial from the checkpoint its experiment snapshot names, and that snapshot can lag
the epochs already reported (see :class:`ResumeFromLastReport`). Mending it needs Tune's private
bookkeeping: the trial's checkpoint manager (``_checkpoint_results``, ``_latest_checkpoint_result``),
``ray.train._internal.session._TrainingResult`` and ``StorageContext.current_checkpoint_index``.
Smaller uses live here too: :func:`tuner_run_config` (a restored Tuner's pickled run config,
given this run's console), :func:`stdstream_dispatcher` (the workers' forwarded output, filtered) and
:func:`mlflow_run_id` (the MLflow run Ray's logger callback opened for a trial).
Nothing else in covid_tune uses a private Ray name; ``tests/test_resume.py`` checks that each one
still exists in the installed Ray, so a Ray upgrade that moves them fails there, by name, first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray import tune

log = logging.getLogger(__name__)


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
            _truncate_to_checkpoint(trial)
        except Exception as exc:  # noqa: BLE001 - never stop a sweep over this repair
            log.warning(f"could not check trial {trial}'s last checkpoint: {type(exc).__name__}: {exc}")

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

    from covid_tune.engine.checkpoints import METRICS_FILE, STATE_FILE

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
            log.warning(f"{trial}: resuming from {where}; the checkpoints of reported epoch(s) {again} "
                  "are gone, they are trained again")
        return False
    name = chosen["checkpoint_dir_name"]
    folder = f"{trial.storage.trial_fs_path}/{name}"
    # the trainable numbers its next checkpoint one past the trial's index, which on_checkpoint
    # sets to this checkpoint's (it adds 1, as after any checkpoint)
    trial.storage.current_checkpoint_index = int(name.rsplit("_", 1)[1]) - 1
    trial.on_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(folder, filesystem=fs), metrics=chosen))
    lost = [r["epoch"] for r in rows if r["training_iteration"] > chosen["training_iteration"]]
    log.warning(f"{trial}: resuming from {name} (epoch {chosen['epoch']}"
          + (f"; the checkpoints of reported epoch(s) {lost} are gone, they are trained again" if lost
             else ", its last reported one") + f"), not {was} as Tune's state had it")
    return True


def _restored_epoch(trial) -> int:
    """The epoch the trial will resume after: the one its restore checkpoint holds (its metrics.json,
    written with the state, so the checkpoint alone says it), 0 when it starts from scratch."""
    current = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
    if current is None:
        return 0
    fs = trial.storage.storage_filesystem
    with fs.open_input_stream(f"{current.checkpoint.path}/{_metrics_file()}") as f:
        return int(json.loads(f.read())["epoch"])


def _metrics_file() -> str:
    from covid_tune.engine.checkpoints import METRICS_FILE

    return METRICS_FILE


def keep_rows_upto(text: str, epoch: int, csv_header: bool) -> str | None:
    """``text`` (result.json lines, or progress.csv with its header) without the rows of epochs after
    ``epoch`` (and what follows the first of them); None when nothing is dropped."""
    import csv
    import io

    lines = text.splitlines(keepends=True)
    start = 1 if csv_header and lines else 0
    column = None
    if csv_header and lines:
        header = next(csv.reader([lines[0]]), [])
        column = header.index("epoch") if "epoch" in header else None
        if column is None:
            return None
    for i in range(start, len(lines)):
        try:
            if csv_header:
                value = next(csv.reader(io.StringIO(lines[i])))[column]
            else:
                value = json.loads(lines[i]).get("epoch")
            row_epoch = int(float(value)) if value not in (None, "") else None
        except (ValueError, IndexError, StopIteration, AttributeError):  # a line cut off when the driver died
            row_epoch = epoch + 1
        if row_epoch is not None and row_epoch > epoch:
            return "".join(lines[:i])
    return None


def _truncate_to_checkpoint(trial) -> list[str]:
    """Drop from ``trial``'s result.json and progress.csv (on storage and in the driver's staging copy)
    the rows of epochs after the checkpoint it resumes from: those epochs are trained again and reported
    anew, so that each epoch appears exactly once whatever moment the driver or the trial died at.

    Rewritten in place (not replaced): Tune's loggers may hold the driver's copies open for appending.
    Returns the files changed."""
    import pyarrow.fs

    if trial.status not in ("PENDING", "PAUSED"):
        return []
    epoch = _restored_epoch(trial)
    fs = trial.storage.storage_filesystem
    changed = []
    for name, is_csv in (("result.json", False), ("progress.csv", True)):
        remote = f"{trial.storage.trial_fs_path}/{name}"
        if fs.get_file_info(remote).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(remote) as f:
                kept = keep_rows_upto(f.read().decode(), epoch, is_csv)
            if kept is not None:
                with fs.open_output_stream(remote) as f:
                    f.write(kept.encode())
                changed.append(remote)
        staged = Path(trial.storage.trial_driver_staging_path, name)
        if staged.is_file() and str(staged) != remote:
            kept = keep_rows_upto(staged.read_text(), epoch, is_csv)
            if kept is not None:
                with staged.open("r+") as f:
                    f.write(kept)
                    f.truncate()
                changed.append(str(staged))
    if changed:
        log.warning(f"{trial}: resuming after epoch {epoch} (its checkpoint); the rows of later epochs "
              "are dropped, those epochs are trained and reported again")
    return changed


class RecordStateDigest(tune.Callback):
    """Record the SHA-256 (and a copy) of Tune's experiment state files each time Tune writes them
    (:mod:`covid_tune.sweep.resume_guard`), so that a --resume after a killed driver finds them recorded.

    Tune saves its state into the driver's staging folder inside a step (``on_step_end`` comes right
    after the save) and copies the folder to storage in the background, at most every sync period
    unless forced: the copy a restore reads can be many saves older than the staging one. So both are
    hashed whenever they change, each step; and again when the experiment ends (its last, forced save).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self._seen: dict[str, tuple[int, int]] = {}
        self._digests: dict[str, str] = {}  # file name -> the digest recorded last

    def _record(self, trials: list) -> None:
        import hashlib

        from covid_tune.sweep import resume_guard

        if not trials:
            return
        try:
            storage = trials[0].storage
            folders = dict.fromkeys((storage.experiment_driver_staging_path, storage.experiment_fs_path))
            for folder in folders:
                changed = {}
                for path, stamp in resume_guard.guarded_stats(Path(folder)):
                    if self._seen.get(str(path)) != stamp:
                        self._seen[str(path)] = stamp
                        data = path.read_bytes()
                        digest = hashlib.sha256(data).hexdigest()
                        # the copy on storage of bytes just recorded from staging: recorded already
                        if self._digests.get(path.name) != digest:
                            self._digests[path.name] = digest
                            changed[path.name] = data
                resume_guard.record_files(Path(self.output_dir), changed)
        except OSError as exc:  # never stop a sweep over this record; --resume then refuses, naming the file
            log.warning(f"could not record the digest of Tune's state: {exc}")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._record(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._record(trials)

    def __getstate__(self) -> dict:
        return {"output_dir": self.output_dir, "_seen": {}, "_digests": {}}
def tuner_run_config(tuner: tune.Tuner) -> tune.RunConfig:
    """The run config a (restored) Tuner will use: Tune exposes no setter, and a restored Tuner keeps
    the callbacks and verbosity it was pickled with."""
    return tuner._local_tuner.get_run_config()


def stdstream_dispatcher():
    """Ray's dispatcher of the workers' forwarded stdout/stderr (handlers by name), or None where this
    Ray has none."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def mlflow_run_id(callback, trial) -> str | None:
    """The MLflow run Ray's ``MLflowLoggerCallback`` opened for ``trial`` (its private ``_trial_runs``
    map), None before the trial started: the one way to add params to the run Ray made."""
    return getattr(callback, "_trial_runs", {}).get(trial)
