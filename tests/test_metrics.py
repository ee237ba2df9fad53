"""Metrics: every number checked against scikit-learn, and the bootstrap confidence interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from covid_tune.engine.metrics import (
    bootstrap_ci,
    confusion_matrix,
    multi_label_metrics,
    multilabel_confusion,
    single_label_metrics,
)


def single_case(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Random labels; odd seeds leave the last class out of y_true (it may still be predicted)."""
    rng = np.random.default_rng(seed)
    n_classes = 3 + seed % 3
    size = 40 + 7 * seed
    top = n_classes - 1 if seed % 2 else n_classes
    y_true = rng.integers(0, top, size)
    y_pred = np.where(rng.random(size) < 0.6, y_true, rng.integers(0, n_classes, size))
    return y_true, y_pred, n_classes


SEEDS = list(range(8))


@pytest.mark.parametrize("seed", SEEDS)
def test_single_label_metrics_match_sklearn(seed: int) -> None:
    y_true, y_pred, n = single_case(seed)
    if seed % 2:
        assert n - 1 not in y_true
    labels = list(range(n))
    m = single_label_metrics(y_true, y_pred, n)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    f1 = lambda avg: skm.f1_score(y_true, y_pred, average=avg, labels=labels, zero_division=0)  # noqa: E731
    assert np.allclose(m["f1_per_class"], f1(None), atol=1e-12)
    assert len(m["f1_per_class"]) == n
    assert m["f1_macro"] == pytest.approx(f1("macro"), abs=1e-12)
    assert m["f1_weighted"] == pytest.approx(f1("weighted"), abs=1e-12)
    assert m["f1"] == m["f1_macro"]  # headline: macro for single-label
    assert m["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_single_label_absent_and_never_predicted_class_counts_as_zero() -> None:
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    m = single_label_metrics(y_true, y_pred, 3)
    assert m["f1_per_class"][2] == 0.0
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2],
                                                       zero_division=0))
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_single_label_perfect_and_all_wrong() -> None:
    y = np.array([0, 1, 2, 1])
    perfect = single_label_metrics(y, y, 3)
    assert perfect["acc"] == 1.0 and perfect["f1"] == 1.0 and perfect["f1_weighted"] == 1.0
    wrong = single_label_metrics(y, (y + 1) % 3, 3)
    assert wrong["acc"] == 0.0 and wrong["f1"] == 0.0


def test_confusion_matrix_layout() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([1, 0, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # rows true, columns predicted


def multi_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random multi-hot rows; even seeds leave one class absent from y_true."""
    rng = np.random.default_rng(100 + seed)
    n_classes = 2 + seed % 4
    size = 30 + 5 * seed
    y_true = (rng.random((size, n_classes)) < 0.45).astype(int)
    if seed % 2 == 0:
        y_true[:, seed % n_classes] = 0
    flip = rng.random((size, n_classes)) < 0.3
    y_pred = np.where(flip, 1 - y_true, y_true)
    return y_true, y_pred


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_label_metrics_match_sklearn(seed: int) -> None:
    y_true, y_pred = multi_case(seed)
    n = y_true.shape[1]
    labels = list(range(n))
    m = multi_label_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)  # exact-match accuracy
    f1 = lambda avg: skm.f1_score(y_true, y_pred, average=avg, labels=labels, zero_division=0)  # noqa: E731
    assert np.allclose(m["f1_per_class"], f1(None), atol=1e-12)
    assert m["f1_macro"] == pytest.approx(f1("macro"), abs=1e-12)
    assert m["f1_weighted"] == pytest.approx(f1("weighted"), abs=1e-12)
    assert m["f1"] == m["f1_weighted"]  # headline: support-weighted for multi-label
    assert m["confusion"] == skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert np.array_equal(multilabel_confusion(y_true, y_pred), skm.multilabel_confusion_matrix(y_true, y_pred))


def test_multi_label_exact_match_accuracy() -> None:
    y_true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    y_pred = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]])
    m = multi_label_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["f1_per_class"] == pytest.approx([1.0, 1.0, 2 / 3])  # class 2: tp 1, fp 1, fn 0
    assert m["f1"] == pytest.approx((1 * 2 + 1 * 2 + 2 / 3 * 1) / 5)  # supports 2, 2, 1
    assert m["f1_macro"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert m["confusion"][2] == [[1, 1], [0, 1]]


def test_multi_label_accepts_bool_and_float() -> None:
    y_true, y_pred = multi_case(1)
    a = multi_label_metrics(y_true, y_pred)
    b = multi_label_metrics(y_true.astype(np.float32), y_pred.astype(bool))
    assert a == b


# --- bootstrap ---------------------------------------------------------------------------------

def outcomes(n: int, p: float = 0.7, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(int)


@pytest.mark.parametrize("n, seed", [(20, 0), (50, 1), (200, 2), (1000, 3)])
def test_bootstrap_ci_contains_the_mean(n: int, seed: int) -> None:
    correct = outcomes(n, seed=seed)
    lo, hi = bootstrap_ci(correct, seed=seed)
    assert 0.0 <= lo <= correct.mean() <= hi <= 1.0
    assert lo < hi


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    correct = outcomes(80)
    assert bootstrap_ci(correct, seed=7) == bootstrap_ci(correct, seed=7)
    assert bootstrap_ci(correct, seed=7) != bootstrap_ci(correct, seed=8)


def test_bootstrap_ci_narrows_with_more_samples() -> None:
    widths = []
    for n in (25, 100, 400, 1600):
        lo, hi = bootstrap_ci(outcomes(n, seed=n))
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4


def test_bootstrap_ci_wider_for_higher_level() -> None:
    correct = outcomes(100)
    lo50, hi50 = bootstrap_ci(correct, level=0.5)
    lo99, hi99 = bootstrap_ci(correct, level=0.99)
    assert lo99 < lo50 < hi50 < hi99


def test_bootstrap_ci_close_to_normal_approximation() -> None:
    correct = outcomes(2000, p=0.6)
    lo, hi = bootstrap_ci(correct, n_boot=4000)
    p = correct.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(correct))
    assert lo == pytest.approx(p - half, abs=0.005) and hi == pytest.approx(p + half, abs=0.005)


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert bootstrap_ci(np.ones(30)) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(30)) == (0.0, 0.0)
    lo, hi = bootstrap_ci(np.array([]))
    assert np.isnan(lo) and np.isnan(hi)
