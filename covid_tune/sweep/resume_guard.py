"""What a ``--resume`` must find as covid_tune left it: Tune's state files (Tune unpickles them) and the data.

Tune 2.60's restore (``ray/tune/impl/tuner_internal.py``, ``TuneController.resume`` in
``ray/tune/execution/tune_controller.py``) unpickles, from the experiment folder's top level: ``tuner.pkl``
(``pickle.loads``), the newest ``experiment_state-*.json`` (JSON whose non-JSON values are embedded
cloudpickle blobs, decoded with ``allow_cloudpickle=True``), the search algorithm's ``basic-variant-
state-*.json`` / ``search_gen_state-*.json`` and ``searcher-state-*.pkl`` (``cloudpickle.load``) and the
callbacks' saved state. Trial folders hold ``params.pkl`` (not read on restore) and checkpoints (read with
``torch.load(weights_only=True)``). So every regular file at the experiment folder's top level is guarded: its
SHA-256 is recorded in ``OUTPUT/state-digest.json`` each time Tune writes it during a covid_tune run
(``ray_internals.RecordStateDigest``; ``tuner.pkl`` right after Tune writes it, once) and when the run ends,
and the recorded bytes are kept in ``OUTPUT/state-verified/``. ``--resume`` refuses (exit 2) a file whose
digest is not among those recorded, an unrecorded file, or a folder with no record at all, before Tune reads
anything; except a state file Tune saves again and again (``RESAVED``) whose recorded copy is there: a driver
killed while Tune saves its state leaves a newer file than the last record, so that file is replaced by the
recorded copy, never read, and Tune resumes from it (a snapshot a moment older, which Tune's restore handles
as any lagging snapshot; ``ray_internals.ResumeFromLastReport`` catches each trial up to its last reported
epoch).

The data a sweep started with (``data.root``, ``class_map``, synthetic settings, and a digest of the
file list: relative paths and sizes) is recorded in ``OUTPUT/data-digest.json`` at the first start;
``--resume`` with other data is refused the same way.

No Ray here: the check runs before Ray starts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from covid_tune.engine.files import write_atomic

if TYPE_CHECKING:
    from covid_tune.spec.load import Spec

log = logging.getLogger(__name__)

STATE_DIGEST_FILE = "state-digest.json"
VERIFIED_DIR = "state-verified"  # the recorded bytes of each guarded file, the newest record
# the files Tune saves again and again during a run (its templates in ray/tune): a kill can land between
# such a save and its record; tuner.pkl is written once, before any trial, and recorded right after
# (a searcher, search.algorithm optuna, saves search_gen_state-*.json and searcher-state-*.pkl)
RESAVED = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
DATA_DIGEST_FILE = "data-digest.json"
KEEP = 64  # digests kept per file: the copy on storage may be several saves older than the newest
# the data settings that decide which images and classes (a label table: its path, columns and split fractions)
DATA_KEYS = ("root", "class_map", "synthetic", "labels", "columns", "splits")
# with data.folds: which pooled images a fold trial trains and validates on. Recorded only with folds, so a
# sweep without them keeps the record it had; the plan check catches a changed fold count, not these.
FOLD_KEYS = ("folds", "group_by", "fold_seed")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def guarded_files(folder: Path) -> list[Path]:
    """The files of an experiment folder that Tune's restore may unpickle (see the module doc)."""
    return [path for path, _ in guarded_stats(folder)]


def guarded_stats(folder: Path) -> list[tuple[Path, tuple[int, int]]]:
    """:func:`guarded_files` with each file's (mtime_ns, size). One directory scan: the trial folders
    beside them (hundreds in a large sweep, scanned after every step of Tune's loop) cost no stat."""
    try:
        with os.scandir(folder) as entries:
            found = [(Path(e.path), (st.st_mtime_ns, st.st_size)) for e in entries
                     if not e.name.startswith(".") and e.is_file() and (st := e.stat())]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def record_state(output_dir: Path, digests: dict[str, str]) -> None:
    """Add ``digests`` (file name -> SHA-256) to ``output_dir/state-digest.json``."""
    path = Path(output_dir) / STATE_DIGEST_FILE
    try:
        known = json.loads(path.read_text()).get("files", {})
    except (OSError, ValueError):
        known = {}
    for name, digest in digests.items():
        seen = [d for d in known.get(name, []) if d != digest]
        known[name] = (seen + [digest])[-KEEP:]
    _write_json(path, {"about": "SHA-256 of the Tune state files covid_tune saw written (--resume checks them)",
                       "files": known})


def record_files(output_dir: Path, files: dict[str, bytes]) -> None:
    """Record the SHA-256 of each file's bytes (name -> bytes), then keep those bytes in
    ``OUTPUT/state-verified/`` (written after the record and renamed into place, so the copy there is
    always one whose digest is recorded)."""
    if not files:
        return
    record_state(output_dir, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    folder = Path(output_dir) / VERIFIED_DIR
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        write_atomic(folder / name, data)


def clear_record(output_dir: Path) -> None:
    """Forget the recorded state (a new sweep starts its own record)."""
    import shutil

    (Path(output_dir) / STATE_DIGEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(output_dir) / VERIFIED_DIR, ignore_errors=True)


def record_experiment_state(spec: Spec) -> None:
    """Record the experiment folder's guarded files as they are now (a local folder)."""
    if spec.remote_storage:
        return
    record_files(spec.output_dir, {p.name: p.read_bytes() for p in guarded_files(spec.experiment_dir)})


def check_state(spec: Spec) -> str | None:
    """Why Tune's state in ``spec``'s experiment folder must not be restored, or None when every file
    Tune would unpickle is one covid_tune recorded. Storage URIs are not checked (covid_tune does not
    own that storage)."""
    if spec.remote_storage:
        return None
    files = guarded_files(spec.experiment_dir)
    if not files:
        return None
    record = Path(spec.output_dir) / STATE_DIGEST_FILE
    try:
        known = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return (f"--resume: {record} is missing or unreadable, so nothing says that {files[0]} and the other "
                "Tune state files are the ones covid_tune wrote; Tune would unpickle them (run code from them). "
                "Refusing; pass --overwrite to start the sweep again")
    for path in files:
        if sha256_file(path) in known.get(path.name, []):
            continue
        copy = Path(spec.output_dir) / VERIFIED_DIR / path.name
        resaved = any(fnmatch.fnmatch(path.name, pattern) for pattern in RESAVED)
        if resaved and copy.is_file() and sha256_file(copy) in known.get(path.name, []):
            write_atomic(path, copy.read_bytes())
            log.warning(f"{path} is not the file covid_tune last recorded (a driver killed while Tune saves its "
                        "state leaves one): resuming from the recorded copy, a moment older; the unrecorded file "
                        "is never read")
        else:
            what = "was not written by covid_tune's run" if path.name not in known else "changed"
            return (f"--resume: {path} {what} since covid_tune last wrote this sweep (its SHA-256 is not in "
                    f"{record}); Tune would unpickle it (run code from it). Refusing; restore the file, or pass "
                    "--overwrite to start the sweep again")
    return None


def _data_files(root: Path) -> list[tuple[str, int]]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                p = Path(folder, name)
                out.append((p.relative_to(root).as_posix(), p.stat().st_size))
    return sorted(out)


def data_digest(spec: Spec, root: Path) -> dict:
    """The data settings and a digest of the files under ``root`` (relative paths and sizes)."""
    files = _data_files(root)
    h = hashlib.sha256("".join(f"{p}\t{n}\n" for p, n in files).encode())
    if spec.data.labels is not None and Path(spec.data.labels).is_file():
        h.update(Path(spec.data.labels).read_bytes())  # a label table's rows: its labels, patients and splits
    data = spec.data.model_dump(mode="json")
    keys = DATA_KEYS + (FOLD_KEYS if data.get("folds") else ())
    return {"settings": {k: data.get(k) for k in keys}, "root": str(Path(root).resolve()),
            "files": len(files), "sha256": h.hexdigest(),
            "folders": sorted({"/".join(p.split("/")[:2]) for p, _ in files if p.count("/") >= 2})}


def record_data(spec: Spec, root: Path) -> None:
    """Record the data the sweep starts with (a new sweep only: a resumed one keeps its first record)."""
    _write_json(Path(spec.output_dir) / DATA_DIGEST_FILE, data_digest(spec, root))


def check_data(spec: Spec, root: Path) -> str | None:
    """Why ``--resume`` with ``spec``'s data must be refused (other root, classes or files than the sweep
    started with), or None. A folder without a record (older covid_tune) is not checked."""
    record = Path(spec.output_dir) / DATA_DIGEST_FILE
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    now = data_digest(spec, root) if Path(root).is_dir() else {"settings": {}, "root": str(root), "files": 0,
                                                                "sha256": None, "folders": []}
    changed = [f"data.{k}: {before['settings'].get(k)!r} -> {now['settings'].get(k)!r}" for k in DATA_KEYS + FOLD_KEYS
               if before.get("settings", {}).get(k) != now["settings"].get(k)]
    if before.get("root") != now["root"]:
        changed.append(f"data folder {before.get('root')} -> {now['root']}")
    if not changed and before.get("sha256") != now["sha256"]:
        changed.append(f"the files under {now['root']} or the label table ({before.get('files')} files then, "
                       f"{now['files']} now"
                       + (f"; class folders then {before.get('folders')}, now {now['folders']}"
                          if before.get("folders") != now["folders"] else "; same names, other sizes or files")
                       + ")")
    if changed:
        return (f"--resume: the data differ from those {spec.output_dir} was started with ({'; '.join(changed)}). "
                "Resume with the same data, or pass --overwrite to start again")
    return None
