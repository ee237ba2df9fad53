"""Cross-validated estimates (results/crossval.py) and their REPORT.md section, on hand-made result rows."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from covid_tune.report.crossval import section
from covid_tune.results.crossval import cross_validation, t_interval
from covid_tune.results.stats import best_group, shortlist


def test_t_interval_is_mean_plus_minus_t_sd_over_root_k() -> None:
    values = [0.81, 0.86, 0.79, 0.9, 0.84]
    mean, (lo, hi) = t_interval(values)
    half = 2.7764451051977987 * np.std(values, ddof=1) / math.sqrt(5)  # t(4, 0.975), by hand
    assert math.isclose(mean, 0.84) and math.isclose(lo, 0.84 - half) and math.isclose(hi, 0.84 + half)
    # the same as scipy's own t interval of a mean
    ref = sps.t.interval(0.95, 4, loc=np.mean(values), scale=sps.sem(values))
    assert np.allclose([lo, hi], ref)
    assert t_interval([0.5])[1] is None


def fold_row(group: str, fold: int, seed: int, logits: np.ndarray, y: np.ndarray, test_acc: float) -> dict:
    acc = float((logits.argmax(1) == y).mean())
    return {"config_id": f"{group}-f{fold}-s{seed}", "group": group, "fold": fold, "seed": seed,
            "select_score": acc, "best_epoch": 1, "history": [],
            "eval": {"validation": {"acc": acc, "n": len(y), "logits": logits.tolist(), "y": y.tolist()},
                     "test": {"acc": test_acc, "correct": [1, 0]}},
            "clinical": {"label_mode": "single", "positive": "covid", "all_classes": ["covid", "normal"]}}


def test_cross_validation_numbers() -> None:
    rng = np.random.default_rng(0)
    rows, folds_y, probs = [], [], []
    for fold in range(3):
        y = rng.integers(0, 2, 20)
        per_seed = []
        for seed in (0, 1):
            logits = rng.normal(size=(20, 2)) + 1.5 * np.eye(2)[y]
            rows.append(fold_row("a", fold, seed, logits, y, 0.8 + 0.01 * fold))
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            per_seed.append(p)
        folds_y.append(y)
        probs.append(np.mean(per_seed, axis=0))
    cv = cross_validation(rows)["a"]
    fold_acc = [np.mean([r["eval"]["validation"]["acc"] for r in rows if r["fold"] == f]) for f in range(3)]
    assert np.isclose(cv["estimate"], np.mean(fold_acc)) and cv["k"] == 3
    assert np.allclose(cv["ci"], sps.t.interval(0.95, 2, loc=np.mean(fold_acc), scale=sps.sem(fold_acc)))
    p, y = np.concatenate(probs), np.concatenate(folds_y)
    assert cv["oof"]["n"] == 60 and np.isclose(cv["oof"]["acc"], np.mean(p.argmax(1) == y))
    assert np.isclose(cv["oof"]["auc"], roc_auc_score(y == 0, p[:, 0]))
    assert cv["oof"]["acc_ci"][0] < cv["oof"]["acc"] < cv["oof"]["acc_ci"][1]
    assert np.isclose(cv["test_acc"], 0.81)
    md = "\n".join(section({"a": cv}, "a", {"a": {"acc": 0.85, "members": 6, "members_acc": 0.81}}))
    assert "## Cross-validation" in md and "**a**" in md and "### Ensembles" in md
    # Δ is the members' mean test accuracy against the estimate (the interval is one model's), not the ensemble's
    assert f"{100 * cv['estimate']:.1f}" in md and f"{100 * (0.81 - cv['estimate']):+.1f}" in md
    assert f"{100 * (0.85 - cv['estimate']):+.1f}" not in md


def test_folds_count_like_seeds_in_selection_and_shortlist() -> None:
    rows = []
    for group, scores in (("a", [0.9, 0.6, 0.6]), ("b", [0.8, 0.8, 0.8])):
        for fold, s in enumerate(scores):
            rows.append({"config_id": f"{group}-f{fold}-s0", "group": group, "fold": fold, "seed": 0,
                         "select_score": s, "eval": {"test": {"correct": [1]}}})
    assert best_group(rows, "val_acc", "max") == "b"  # a's best single fold does not win it
    # beyond top_k, every fold of the chosen groups is kept (its estimate needs all)
    assert shortlist(rows, "val_acc", "max", 1) == ["b-f0-s0", "b-f1-s0", "b-f2-s0"]


def test_results_csv_names_each_rows_fold() -> None:
    """results.csv: one row per trial, its fold beside its seed (empty without data.folds)."""
    from covid_tune.report.sections import CSV_COLUMNS, flat_row

    assert CSV_COLUMNS.index("fold") == CSV_COLUMNS.index("seed") + 1
    assert flat_row({"config_id": "g-f1-s0", "seed": 0, "fold": 1})["fold"] == 1
    assert flat_row({"config_id": "g-s0", "seed": 0})["fold"] is None
