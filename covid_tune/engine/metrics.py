"""Classification metrics on numpy arrays, matching scikit-learn's definitions.

Computed here rather than by calling scikit-learn every epoch so the engine stays light; the
tests check every number against scikit-learn (``labels=range(n_classes)``: classes absent from
a split still count in macro averages, with F1 0).

Headline ``f1``: macro F1 for single-label tasks, support-weighted F1 for multi-label tasks.
"""

from __future__ import annotations

import numpy as np


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(len(tp), dtype=float), where=denom > 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes (scikit-learn's layout)."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def multilabel_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per class ``[[tn, fp], [fn, tp]]``, as scikit-learn's ``multilabel_confusion_matrix``."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp = (t & p).sum(0)
    fp = (~t & p).sum(0)
    fn = (t & ~p).sum(0)
    tn = (~t & ~p).sum(0)
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).astype(np.int64)


def single_label_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, per-class/macro/weighted F1 and the confusion matrix for class indices."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm)
    per_class = _f1_from_counts(tp, cm.sum(0) - tp, cm.sum(1) - tp)
    return _summary(float(tp.sum() / max(cm.sum(), 1)), per_class, cm.sum(1), cm, headline="macro")


def multi_label_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Exact-match accuracy, per-class/macro/weighted F1 and per-class 2x2 matrices."""
    t, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    mcm = multilabel_confusion(t, p)
    per_class = _f1_from_counts(mcm[:, 1, 1], mcm[:, 0, 1], mcm[:, 1, 0])
    acc = float((t == p).all(1).mean()) if len(t) else 0.0
    return _summary(acc, per_class, t.sum(0), mcm, headline="weighted")


def _summary(acc: float, per_class: np.ndarray, support: np.ndarray, confusion: np.ndarray,
             headline: str) -> dict:
    total = support.sum()
    weighted = float((per_class * support).sum() / total) if total else 0.0
    macro = float(per_class.mean()) if len(per_class) else 0.0
    return {
        "acc": acc,
        "f1": macro if headline == "macro" else weighted,
        "f1_macro": macro,
        "f1_weighted": weighted,
        "f1_per_class": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean of per-sample 0/1 outcomes."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n_boot, len(correct)))].mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))
