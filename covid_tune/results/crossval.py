"""Cross-validated estimates of a sweep with ``data.folds``: per configuration (group), the mean over folds of
the held-out accuracy with a t interval, the pooled out-of-fold accuracy and AUC with theirs, and the
per-fold numbers.

Each fold trial's evaluation (:func:`covid_tune.results.collect.evaluate_export`) ran on its fold's view, so
its ``validation`` outputs are out-of-fold predictions: every pooled image is predicted once per seed, by
the models that never trained on it. With several seeds a fold's accuracy is the mean over its seeds, and
an image's out-of-fold probability the mean of its seeds' probabilities.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import t as student_t

from covid_tune.results import clinical
from covid_tune.results.stats import accuracy_on_test

LEVEL = 0.95


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, list[float] | None]:
    """Mean of ``values`` (one per fold) and its interval ``mean +- t_{K-1, (1+level)/2} * sd / sqrt(K)`` (sample
    sd, ddof 1); no interval for fewer than two values."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    half = float(student_t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, [mean - half, mean + half]


def _val_acc(row: dict) -> float | None:
    ev = (row.get("eval") or {}).get("validation") or {}
    if ev.get("acc") is not None:
        return float(ev["acc"])
    at = next((h for h in row.get("history") or [] if h.get("epoch") == row.get("best_epoch")), {})
    return None if at.get("val_acc") is None else float(at["val_acc"])


def out_of_fold(members: list[dict]) -> dict | None:
    """Pooled out-of-fold accuracy [exact interval] and the positive class's ROC AUC [DeLong interval] of one
    group's fold trials (single-label; None without stored validation outputs)."""
    by_fold: dict[int, list[dict]] = {}
    for r in members:
        val = ((r.get("eval") or {}).get("validation") or {})
        if "logits" in val and (r.get("clinical") or {}).get("label_mode", "single") == "single":
            by_fold.setdefault(r["fold"], []).append(r)
    if not by_fold:
        return None
    probs, ys = [], []
    for fold in sorted(by_fold):
        rows = by_fold[fold]
        p = np.mean([clinical.calibrated(np.asarray(r["eval"]["validation"]["logits"], dtype=float), "single", 1.0)
                     for r in rows], axis=0)
        probs.append(p)
        ys.append(np.asarray(rows[0]["eval"]["validation"]["y"]))
    p, y = np.concatenate(probs), np.concatenate(ys)
    correct = int((p.argmax(1) == y).sum())
    acc, acc_ci = clinical.proportion(correct, len(y))
    out = {"n": int(len(y)), "acc": acc, "acc_ci": acc_ci, "folds": sorted(by_fold), "auc": None, "auc_ci": None,
           "positive": None}
    positive = next((r["clinical"]["positive"] for r in members if r.get("clinical")), None)
    classes = next((r["clinical"]["all_classes"] for r in members if r.get("clinical")), None)
    if positive is not None:
        yk = (y == classes.index(positive)).astype(int)
        if 0 < yk.sum() < len(yk):
            auc, psi = clinical.auc_influence(yk, p[:, classes.index(positive)])
            out.update(auc=auc, auc_ci=clinical.auc_ci(auc, psi), positive=positive)
    return out


def cross_validation(rows: list[dict]) -> dict[str, dict]:
    """Per group with fold trials: ``estimate`` (mean over folds of the held-out accuracy, each fold's the
    mean over its seeds) with ``ci`` (:func:`t_interval`), ``folds`` (per fold: validation images, held-out
    accuracy, mean test accuracy, seeds), ``oof`` (:func:`out_of_fold`) and ``test_acc`` (the mean test
    accuracy of the members evaluated on test)."""
    out: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("fold") is not None:
            groups.setdefault(r["group"], []).append(r)
    for group, members in groups.items():
        folds = []
        for fold in sorted({r["fold"] for r in members}):
            mine = [r for r in members if r["fold"] == fold]
            val = [v for v in map(_val_acc, mine) if v is not None]
            test = [v for v in map(accuracy_on_test, mine) if v is not None]
            n = next((((r.get("eval") or {}).get("validation") or {}).get("n") for r in mine if r.get("eval")), None)
            folds.append({"fold": fold, "n": n, "seeds": len(val), "val_acc": float(np.mean(val)) if val else None,
                          "test_acc": float(np.mean(test)) if test else None})
        scored = [f["val_acc"] for f in folds if f["val_acc"] is not None]
        if not scored:
            continue
        estimate, ci = t_interval(scored)
        tests = [v for v in map(accuracy_on_test, members) if v is not None]
        out[group] = {"k": len(scored), "estimate": estimate, "ci": ci, "folds": folds, "oof": out_of_fold(members),
                      "test_acc": float(np.mean(tests)) if tests else None}
    return out
