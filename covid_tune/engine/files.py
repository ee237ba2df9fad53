"""The names of the files covid_tune writes, in one place, and how a small one is written.

Only the standard library: the command line reads these before it imports torch (a fast ``--help``), and
every stage may use them (the engine writes the exported model; the sweep, results and report the rest).
"""

import os
import shutil
from pathlib import Path

# an exported model folder (OUTPUT/best/<config_id>/): weights, what rebuilds them, its test evaluation
MODEL_WEIGHTS = "model.pt"  # the trained part (the whole state_dict when nothing is frozen)
MODEL_META = "model.json"
EVAL_FILE = "eval.json"
FROZEN_WEIGHTS = "frozen.pt"  # the frozen layers' state_dict, where the model has any (one inode for all sharers)
FROZEN_STORE = ".frozen"  # best/.frozen/<sha256>.pt: each distinct frozen part once, linked as frozen.pt
MEMBERS_DIR = "members"  # an ensemble folder's members/<i>/: its members' model folders, linked

# a sweep's output folder
SPEC_FILE = "spec.json"  # the validated spec the sweep started with
TRIALS_FILE = "trials.json"  # each trial's final status (ok, error, interrupted)
SPLITS_CSV = "splits.csv"  # a label table's split by patient (path, patient, split), as the run used it
DATA_CHECKS_FILE = "data-checks.json"  # what the driver found in the data (duplicates), for a rebuilt report
RESULTS_FILE = "report/results.json"  # every number of the report, the best configuration among them
MLFLOW_FOLDER = "mlruns"  # tracking.mlflow's file store when no uri is given
WANDB_FOLDER = "wandb"  # what W&B writes into tracking.wandb.dir (default: the output folder)


def _tmp_beside(path: Path) -> Path:
    """A hidden temporary name beside ``path``, this process's own: processes that write the same file at
    once (exporters sharing a frozen part) never write into each other's temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a hidden temporary file beside it, renamed into place, so a
    process killed meanwhile leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _tmp_beside(path)
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` is an exported model: ``model.json`` with ``model.pt``, or an ensemble's members."""
    folder = Path(folder)
    return (folder / MODEL_META).is_file() and ((folder / MODEL_WEIGHTS).is_file() or (folder / MEMBERS_DIR).is_dir())


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (the bytes once on disk, and each folder still whole on its
    own: copying it copies the file), a copy where the filesystem has no hard links; replaced whole.
    Files are never rewritten in place (:func:`write_atomic` renames), so a link never changes behind a sharer."""
    target = Path(target)
    tmp = _tmp_beside(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another filesystem, or one without hard links (some network and FAT mounts)
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def file_bytes_once(paths, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of these files, a file with several hard links counted once (as ``du`` does); ``seen`` carries
    the linked files already counted from one call to the next."""
    seen = set() if seen is None else seen
    total = 0
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:  # removed meanwhile
            continue
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        total += st.st_size
    return total
