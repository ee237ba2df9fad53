"""The chosen configuration shipped as one model: its members' exported models (seeds, folds) averaged.

``best/<group>/ensemble/`` holds ``model.pt`` (the members' state_dicts as one
:class:`~covid_tune.models.registry.Ensemble`)
and ``model.json`` (the first member's, plus ``ensemble.members``), so ``covid-tune predict`` and the test
evaluation load it as they load a single model. Its validation numbers are not an estimate: with
``data.folds`` the members trained on the validation images (the cross-validated estimate is in REPORT.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from covid_tune.engine.files import EVAL_FILE, MODEL_META, MODEL_WEIGHTS
from covid_tune.models.registry import save_exported
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
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("ensemble", {}).get("members") == record:
        return target
    state = {}
    for i, d in enumerate(dirs):
        for k, v in torch.load(d / MODEL_WEIGHTS, map_location="cpu", weights_only=True).items():
            state[f"members.{i}.{k}"] = v
    meta = {**{k: v for k, v in metas[0].items() if k not in ("temperature", "operating_point", "source_checkpoint")},
            "config_id": f"{group}-{ENSEMBLE_DIR}", "group": group, "seed": None, "fold": None,
            "epoch": [m["epoch"] for m in metas], "ensemble": {"how": how, "members": record},
            "metrics": {}}
    (target / EVAL_FILE).unlink(missing_ok=True)
    save_exported(state, meta, target)
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
