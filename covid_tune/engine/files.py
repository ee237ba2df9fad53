"""The names of the files covid_tune writes, in one place, and how a small one is written.

Only the standard library: the command line reads these before it imports torch (a fast ``--help``), and
every stage may use them (the engine writes the exported model; the sweep, results and report the rest).
"""

import os
from pathlib import Path

# an exported model folder (OUTPUT/best/<config_id>/): weights, what rebuilds them, its test evaluation
MODEL_WEIGHTS = "model.pt"
MODEL_META = "model.json"
EVAL_FILE = "eval.json"

# a sweep's output folder
SPEC_FILE = "spec.json"  # the validated spec the sweep started with
TRIALS_FILE = "trials.json"  # each trial's final status (ok, error, interrupted)
SPLITS_CSV = "splits.csv"  # a label table's split by patient (path, patient, split), as the run used it
DATA_CHECKS_FILE = "data-checks.json"  # what the driver found in the data (duplicates), for a rebuilt report
RESULTS_FILE = "report/results.json"  # every number of the report, the best configuration among them
MLFLOW_FOLDER = "mlruns"  # tracking.mlflow's file store when no uri is given
WANDB_FOLDER = "wandb"  # what W&B writes into tracking.wandb.dir (default: the output folder)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a hidden temporary file beside it, renamed into place, so a
    process killed meanwhile leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
