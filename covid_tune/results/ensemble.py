"""The chosen configuration shipped as one model: its members' exported models (seeds, folds) averaged.

``best/<group>/ensemble/`` holds ``members/<i>/`` (each member's model folder, its files hard links to the
member's own: no weights twice on disk) and ``model.json`` (the first member's, plus ``ensemble.members``), so
``covid-tune predict`` and the test evaluation load it (:func:`~covid_tune.models.registry.load_exported`, an
:class:`~covid_tune.models.registry.Ensemble`) as they load a single model. Its validation numbers are not an
estimate: with ``data.folds`` the members trained on the validation images
(the cross-validated estimate is in REPORT.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from covid_tune.engine.files import (
    EVAL_FILE,
    FROZEN_WEIGHTS,
    MEMBERS_DIR,
    MODEL_META,
    MODEL_WEIGHTS,
    link_or_copy,
    write_atomic,
)
from covid_tune.models.registry import FROZEN_META
from covid_tune.results.stats import accuracy_on_test

ENSEMBLE_DIR = "ensemble"


def members(rows: list[dict], group: str, how: str) -> list[dict]:
    """The rows of ``group`` with an exported model that ``how`` (report.ensemble) averages, in plan order."""
    mine = [r for r in rows if r.get("group") == group and r.get("checkpoint")]
    if how == "none" or not mine:
        return []
    folds = sorted({r["fold"] for r in mine if r.get("fold") is not None})
    if how == "seeds" and folds:
        mine = [r for r in mine if r.get("fold") == folds[0]]
    elif how == "folds" and folds:
        lowest = min(r["seed"] for r in mine)
        mine = [r for r in mine if r["seed"] == lowest]
    return mine


def export_ensemble(rows: list[dict], group: str | None, how: str, out_dir: Path) -> Path | None:
    """Write ``out_dir/<group>/ensemble/`` for ``group``'s members (:func:`members`); None for fewer than two.
    Kept as it is (with its evaluation) when it already holds the same members at the same epochs."""
    chosen = members(rows, group, how) if group is not None else []
    if len(chosen) < 2:
        return None
    dirs = [Path(r["checkpoint"]).parent for r in chosen]
    metas = [json.loads((d / MODEL_META).read_text()) for d in dirs]
    target = out_dir / group / ENSEMBLE_DIR
    record = [{"config_id": m["config_id"], "epoch": m["epoch"]} for m in metas]
    meta_path = target / MODEL_META
    if (meta_path.is_file() and (target / MEMBERS_DIR).is_dir()
            and json.loads(meta_path.read_text()).get("ensemble", {}).get("members") == record):
        return target
    meta = {**{k: v for k, v in metas[0].items()
               if k not in ("temperature", "operating_point", "source_checkpoint", FROZEN_META)},
            "config_id": f"{group}-{ENSEMBLE_DIR}", "group": group, "seed": None, "fold": None,
            "epoch": [m["epoch"] for m in metas], "ensemble": {"how": how, "members": record},
            "metrics": {}}
    target.mkdir(parents=True, exist_ok=True)
    (target / EVAL_FILE).unlink(missing_ok=True)
    (target / MODEL_WEIGHTS).unlink(missing_ok=True)  # an earlier version's copy of the members' weights
    # each member's folder linked whole (no second copy of its weights), built aside and renamed into place
    staging = target / f".{MEMBERS_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for i, d in enumerate(dirs):
        folder = staging / str(i)
        folder.mkdir(parents=True)
        for name in (MODEL_WEIGHTS, FROZEN_WEIGHTS, MODEL_META):
            if (d / name).is_file():
                link_or_copy(d / name, folder / name)
    shutil.rmtree(target / MEMBERS_DIR, ignore_errors=True)
    os.replace(staging, target / MEMBERS_DIR)
    write_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True))  # last: names a complete folder
    return target


def summary(ev: dict, member_rows: list[dict]) -> dict:
    """The ensemble's test numbers for REPORT.md: accuracy [its bootstrap interval], the positive class's AUC
    [DeLong], and the members' mean test accuracy."""
    test = ev["splits"]["test"]
    head = ((ev.get("clinical") or {}).get("per_class") or {})
    positive = (ev.get("clinical") or {}).get("positive")
    block = (head.get(positive) or {}).get("test") or {}
    accs = [a for a in map(accuracy_on_test, member_rows) if a is not None]
    return {"members": len(member_rows), "acc": test.get("acc"), "acc_ci": test.get("acc_ci95"),
            "auc": block.get("auc"), "auc_ci": block.get("auc_ci"), "n": test.get("n"),
            "members_acc": float(np.mean(accs)) if accs else None}
