"""Issue 29: ROC/PR with intervals, DeLong, the operating point (validation only), calibration, predict's use
of them, and the report's sections. Fast: no Ray, no training (scores are generated)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, precision_score, recall_score, roc_auc_score

from covid_tune.results import clinical
from covid_tune.spec.load import SpecError, validate


def binary_logits(n: int, rng: np.random.Generator, sharpness: float = 1.5, scale: float = 1.0):
    """Two-class logits whose class-0 margin separates the labels partly; ``scale`` > 1 makes them overconfident."""
    y = rng.integers(0, 2, n)
    margin = sharpness * (1 - 2 * y) + rng.normal(0, 1.2, n)  # class 0 ("infected") when the margin is high
    logits = np.stack([margin / 2, -margin / 2], 1) * scale
    return logits, y


def splits(rng: np.random.Generator, n_val: int = 300, n_test: int = 300, scale: float = 1.0) -> dict:
    (zv, yv), (zt, yt) = binary_logits(n_val, rng, scale=scale), binary_logits(n_test, rng, scale=scale)
    return {"validation": {"logits": zv.tolist(), "y": yv.tolist()}, "test": {"logits": zt.tolist(), "y": yt.tolist()}}


CLASSES = ["infected", "normal"]


# --- numbers against scikit-learn -----------------------------------------------------------------

def test_auc_ap_sensitivity_specificity_equal_scikit_learns() -> None:
    ev = splits(np.random.default_rng(0), scale=3.0)
    out = clinical.evaluate_scores(ev, CLASSES, "single", None, "youden")
    assert out["positive"] == "infected"  # the first class not named normal
    for split in ("validation", "test"):
        block = out["per_class"]["infected"][split]
        y = (np.asarray(ev[split]["y"]) == 0).astype(int)
        p = clinical.calibrated(np.asarray(ev[split]["logits"]), "single", out["temperature"])[:, 0]
        pred = (p >= out["threshold"]).astype(int)
        assert block["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert block["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert block["sens"] == pytest.approx(recall_score(y, pred), abs=1e-12)
        assert block["spec"] == pytest.approx(recall_score(1 - y, 1 - pred), abs=1e-12)
        assert block["ppv"] == pytest.approx(precision_score(y, pred), abs=1e-12)
        assert block["npv"] == pytest.approx(precision_score(1 - y, 1 - pred), abs=1e-12)
        assert block["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        lo, hi = block["sens_ci"]
        assert lo < block["sens"] < hi and block["auc_ci"][0] < block["auc"] < block["auc_ci"][1]
        assert block["ap_ci"][0] < block["ap"] < block["ap_ci"][1]


def test_ece_matches_the_reliability_curve_of_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 2000)
    y = (rng.uniform(0, 1, 2000) < p ** 1.5).astype(int)
    frac, mean_p = calibration_curve(y, p, n_bins=15)
    counts = np.histogram(p, bins=np.linspace(0, 1, 16))[0]
    expected = np.sum(counts[counts > 0] / len(p) * np.abs(frac - mean_p))
    assert clinical.ece(y, p) == pytest.approx(expected, abs=1e-12)
    assert clinical.ece(y, y.astype(float)) == 0.0


def test_bootstrap_ap_uses_scikit_learns_definition_with_weights() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(y, 1.0), 1)  # rounded: ties
    w = rng.integers(0, 3, size=(5, 80))
    w[:, 0] = 1
    mine = clinical._weighted_ap(y, s, w)
    theirs = [average_precision_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(mine, theirs, atol=1e-12)


# --- DeLong ---------------------------------------------------------------------------------------

def test_delong_variance_of_a_hand_computable_case() -> None:
    """Positives 0.9, 0.5, 0.4; negatives 0.5, 0.1. Pairs: 0.9 beats both (1, 1), 0.5 ties 0.5 and beats
    0.1 (0.5, 1), 0.4 loses to 0.5 and beats 0.1 (0, 1): AUC = 4.5/6 = 0.75.
    V10 (per positive) = 1, 0.75, 0.5: S10 = var(ddof 1) = 0.0625. V01 (per negative) = 0.5 (of 3 positives:
    0.9 above, 0.5 tied, 0.4 below -> 1.5/3), 1.0: S01 = 0.125. Var = 0.0625/3 + 0.125/2 = 0.0833..."""
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.5, 0.4, 0.5, 0.1])
    auc, psi = clinical.auc_influence(y, s)
    assert auc == pytest.approx(0.75) and auc == pytest.approx(roc_auc_score(y, s))
    assert np.sum(psi ** 2) == pytest.approx(0.0625 / 3 + 0.125 / 2)
    # a model against itself: no difference, p = 1
    assert clinical.delong_test([(y, s, s)]) == {"diff": 0.0, "z": 0.0, "p": 1.0}


def test_delong_paired_difference_agrees_with_a_paired_bootstrap() -> None:
    """The DeLong standard error of AUC(a) - AUC(b) against 10,000 stratified paired bootstrap replicates
    (positives and negatives resampled separately, both models on the same draw): agreement within the
    bootstrap's Monte-Carlo error (relative SE of a standard deviation from B replicates: 1/sqrt(2B))
    plus the O(1/m) by which a bootstrap and DeLong's unbiased variances differ."""
    rng = np.random.default_rng(3)
    m = n = 120
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    shared = rng.normal(0, 1, m + n)
    a = 1.2 * y + shared + rng.normal(0, 0.6, m + n)
    b = 0.9 * y + shared + rng.normal(0, 0.6, m + n)
    auc_a, psi_a = clinical.auc_influence(y, a)
    auc_b, psi_b = clinical.auc_influence(y, b)
    se = np.sqrt(np.sum((psi_a - psi_b) ** 2))
    # bootstrap: AUC of a resample = weighted mean of the pairwise comparison matrix
    ha = (a[:m, None] > a[None, m:]) + 0.5 * (a[:m, None] == a[None, m:])
    hb = (b[:m, None] > b[None, m:]) + 0.5 * (b[:m, None] == b[None, m:])
    B = 10_000
    cp = rng.multinomial(m, np.full(m, 1 / m), size=B).astype(float)
    cn = rng.multinomial(n, np.full(n, 1 / n), size=B).astype(float)
    diff = (np.sum((cp @ ha) * cn, 1) - np.sum((cp @ hb) * cn, 1)) / (m * n)
    sd = diff.std(ddof=1)
    assert abs(sd - se) / se < 3 / np.sqrt(2 * B) + 2 / m, (sd, se)
    assert abs(diff.mean() - (auc_a - auc_b)) < 3 * sd / np.sqrt(B) + 1e-3
    test = clinical.delong_test([(y, a, b)])
    assert test["z"] == pytest.approx((auc_a - auc_b) / se)


# --- the operating point: validation only ---------------------------------------------------------

@pytest.mark.parametrize("rule", ["youden", "sensitivity=0.95", "specificity=0.95", "0.5"])
def test_operating_point_never_reads_test_labels(rule: str) -> None:
    ev = splits(np.random.default_rng(4))
    first = clinical.evaluate_scores(ev, CLASSES, "single", "infected", rule)
    flipped = {**ev, "test": {**ev["test"], "y": [1 - v for v in ev["test"]["y"]]}}
    shuffled = {**ev, "test": {**ev["test"], "logits": ev["test"]["logits"][::-1]}}
    for other in (flipped, shuffled):
        again = clinical.evaluate_scores(other, CLASSES, "single", "infected", rule)
        assert again["threshold"] == first["threshold"] and again["temperature"] == first["temperature"]
    assert first["per_class"]["infected"]["test"]["auc"] != clinical.evaluate_scores(
        flipped, CLASSES, "single", "infected", rule)["per_class"]["infected"]["test"]["auc"]
    val = first["per_class"]["infected"]["validation"]
    if rule == "sensitivity=0.95":
        assert val["sens"] >= 0.95
    if rule == "specificity=0.95":
        assert val["spec"] >= 0.95
    if rule == "0.5":
        assert first["threshold"] == 0.5


def test_youden_threshold_maximises_sensitivity_plus_specificity_on_validation() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    t = clinical.choose_threshold(y, p, "youden")
    best = max((np.mean(p[y == 1] >= c) + np.mean(p[y == 0] < c), c) for c in np.unique(p))
    got = np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t)
    assert got == pytest.approx(best[0])


# --- calibration ----------------------------------------------------------------------------------

def test_temperature_scaling_lowers_validation_nll_of_an_overconfident_model_and_keeps_accuracy() -> None:
    rng = np.random.default_rng(6)
    z, y = binary_logits(500, rng, scale=6.0)  # six times too sure of itself
    z3 = np.concatenate([z, rng.normal(0, 1, (500, 1)) * 6.0], 1)  # and a third class, for the softmax
    t = clinical.fit_temperature(z3, y, "single")
    assert 3 < t < 12
    assert clinical.nll(z3, y, "single", t) < clinical.nll(z3, y, "single") - 0.3
    assert np.array_equal(clinical.calibrated(z3, "single", t).argmax(1), z3.argmax(1))
    # multi-label: one temperature per class column, sigmoid NLL
    col = z3[:, 0]
    tc = clinical.fit_temperature(col, (y == 0).astype(float), "multi")
    assert clinical.nll(col, y == 0, "multi", tc) < clinical.nll(col, y == 0, "multi")
    # the report's numbers: ECE falls after scaling
    out = clinical.evaluate_scores({"validation": {"logits": z.tolist(), "y": y.tolist()},
                                    "test": {"logits": z.tolist(), "y": y.tolist()}}, CLASSES, "single")
    block = out["per_class"]["infected"]["validation"]
    assert block["nll"] < block["nll_raw"] and block["ece"] < block["ece_raw"]


# --- multi-label (part2-shaped) -------------------------------------------------------------------

def part2_scores(rng: np.random.Generator, n: int) -> dict:
    """covid / normal / pneumonia as multi-hot rows with covid implying pneumonia, sigmoid logits."""
    label = rng.integers(0, 3, n)
    y = np.zeros((n, 3), int)
    y[np.arange(n), label] = 1
    y[label == 0, 2] = 1  # covid -> pneumonia
    logits = 2.0 * (2 * y - 1) + rng.normal(0, 1.5, (n, 3))
    return {"logits": logits.tolist(), "y": y.tolist()}


def test_multi_label_per_class_auc_and_macro() -> None:
    rng = np.random.default_rng(7)
    classes = ["covid", "normal", "pneumonia"]
    ev = {"validation": part2_scores(rng, 150), "test": part2_scores(rng, 150)}
    out = clinical.evaluate_scores(ev, classes, "multi", None, "youden")
    assert out["classes"] == classes and len(out["temperature"]) == 3 and len(out["threshold"]) == 3
    y, z = np.asarray(ev["test"]["y"]), np.asarray(ev["test"]["logits"])
    aucs = [roc_auc_score(y[:, k], z[:, k]) for k in range(3)]  # temperature > 0 keeps the ranking
    for k, c in enumerate(classes):
        assert out["per_class"][c]["test"]["auc"] == pytest.approx(aucs[k], abs=1e-12)
        p = clinical.calibrated(z[:, k], "multi", out["temperature"][k])
        assert out["per_class"][c]["test"]["ap"] == pytest.approx(average_precision_score(y[:, k], p), abs=1e-12)
    assert out["macro"]["auc"] == pytest.approx(roc_auc_score(y, z, average="macro"), abs=1e-12)
    lo, hi = out["macro"]["auc_ci"]
    assert lo < out["macro"]["auc"] < hi
    assert clinical.headline(out)["auc"] == out["macro"]["auc"]


# --- the spec -------------------------------------------------------------------------------------

def test_spec_validates_the_operating_point_and_the_positive_class(tiny_raw: dict) -> None:
    for good, kept in (("youden", "youden"), ("sensitivity=0.95", "sensitivity=0.95"), (0.5, "0.5"),
                       ("specificity=0.9", "specificity=0.9")):
        assert validate({**tiny_raw, "report": {"operating_point": good}}).report.operating_point == kept
    for bad in ("best", "sensitivity=1.5", "precision=0.9", True):
        with pytest.raises(SpecError, match="report.operating_point.*allowed: youden"):
            validate({**tiny_raw, "report": {"operating_point": bad}})
    assert validate({**tiny_raw, "report": {"positive": "normal"}}).report.positive == "normal"
    with pytest.raises(SpecError, match="report.positive: 'covid' is not a class of the data .allowed: infected, norm"):
        validate({**tiny_raw, "report": {"positive": "covid"}})


# --- predict applies the stored temperature and threshold ----------------------------------------

def test_predict_applies_the_stored_temperature_and_threshold(tmp_path: Path, capsys) -> None:
    import torch
    from conftest import write_image
    from test_explain import export_untrained

    from covid_tune.cli import predict as predict_mod
    from covid_tune.models.registry import load_exported

    model_dir = export_untrained(tmp_path / "model")
    files = [write_image(tmp_path / "imgs" / f"{i}.png", size=40, seed=i) for i in range(6)]
    model, meta = load_exported(model_dir)
    _, tensors, _ = predict_mod.load_batch(files, meta)
    with torch.no_grad():
        logits = model(torch.stack(tensors)).double().numpy()
    t = 0.05  # sharpens an untrained model's near-even outputs, so the threshold matters
    p = clinical.calibrated(logits, "single", t)
    threshold = float(np.median(p[:, 0]))
    meta_path = model_dir / "model.json"
    meta.update(temperature=t, operating_point={"rule": "youden", "positive": "infected", "threshold": threshold})
    meta_path.write_text(json.dumps(meta))
    assert predict_mod.main([str(model_dir), str(tmp_path / "imgs"), "--csv", str(tmp_path / "p.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = {ln.split("\t")[0]: ln.split("\t") for ln in lines}
    for f, row in zip(files, p):
        path, decision, *probs = got[str(f)]
        assert decision == ("infected" if row[0] >= threshold else "normal")
        assert [float(x.split("=")[1]) for x in probs] == pytest.approx(row.tolist(), abs=1e-4)
    decisions = [got[str(f)][1] for f in files]
    assert "infected" in decisions and "normal" in decisions  # the threshold, not argmax at T = 1, decided


# --- rows of a report: paired DeLong per group, per-source AUC ------------------------------------

def fake_row(group: str, seed: int, ev: dict) -> dict:
    out = clinical.evaluate_scores(ev, CLASSES, "single", "infected", "youden")
    return {"group": group, "seed": seed, "config_id": f"{group}-s{seed}", "clinical": out,
            "eval": {"test": ev["test"]}}


def test_auc_comparison_pairs_seeds_and_sources_get_their_own_auc() -> None:
    from covid_tune.report import evidence

    rng = np.random.default_rng(8)
    base = splits(rng)
    y = base["test"]["y"]
    noisy = {s: {**base[s], "logits": (np.asarray(base[s]["logits"]) + rng.normal(0, 2, (300, 2))).tolist()}
             for s in base}
    rows = [fake_row("good", 0, base), fake_row("good", 1, base), fake_row("bad", 0, noisy), fake_row("bad", 1, noisy)]
    cmp = clinical.compare_auc_to_best(rows, "good")
    assert cmp["good"]["p"] == 1.0 and cmp["bad"]["seeds"] == 2
    # seeds 0 and 1 are the same scores here: the mean over the pairs is the one-pair test
    yb = (np.asarray(y) == 0).astype(int)
    one = clinical.delong_test([(yb, clinical.test_scores(rows[2], "infected")[1],
                                 clinical.test_scores(rows[0], "infected")[1])])
    assert cmp["bad"]["p"] == pytest.approx(one["p"]) and cmp["bad"]["p"] < 0.05
    cell = f"{one['p']:.3f}" if one["p"] >= 0.001 else "<0.001"
    assert evidence.auc_p_cells(cmp, "good") == {"good": "best", "bad": cell}
    # per source: the AUC inside each source, none where a source has one class
    yy, p = clinical.test_scores(rows[0], "infected")
    sources = ["a" if i % 2 else "b" for i in range(len(yy))]
    sources[:5] = ["c"] * 5
    yy[:5] = 1
    by = clinical.auc_by_source(yy, p, sources)
    mask = np.asarray(sources) == "a"
    assert by["a"]["auc"] == pytest.approx(roc_auc_score(yy[mask], p[mask])) and by["c"]["auc"] is None
    row = {"config_id": "x", "auc_by_source": by, "clinical": rows[0]["clinical"]}
    md = "\n".join(evidence.source_auc_table([row]))
    assert "- (one class)" in md and f"{by['a']['auc']:.3f}" in md


# --- end to end: a part2-shaped multi-label run, trained here without Ray -------------------------

@pytest.mark.slow
def test_part2_shaped_run_reports_per_class_evidence_and_predict_uses_it(tmp_path: Path, capsys) -> None:
    import csv

    import pandas as pd
    from conftest import shrink
    from explain_helpers import fake_sweep

    from covid_tune.cli import predict as predict_mod
    from covid_tune.report import build as report_mod

    classes = ["covid", "normal", "pneumonia"]
    raw = shrink({"name": "p2", "data": {"synthetic": {"classes": classes, "train": 16, "validation": 12, "test": 12,
                                                      "image_size": 36},
                                        "label_mode": "multi", "implies": {"covid": ["pneumonia"]}},
                  "grid": {"backbone": ["tiny_cnn"], "freeze": ["none"], "loss": ["bce", "focal"]},
                  "scheduler": {"metric": "val_f1"}, "report": {"shortcut_check": False, "gradcam": {"per_class": 0}}},
                 tmp_path, trainer={"optimizer": "adam", "lr": 0.003, "epochs": 3, "head_hidden": 0})
    out = fake_sweep(raw)
    results = json.loads((out / "report" / "results.json").read_text())
    table = pd.read_csv(out / "report" / "results.csv")
    for row in results["rows"]:
        cid = row["config_id"]
        ev = json.loads((out / "best" / cid / "eval.json").read_text())["splits"]["test"]
        y, z = np.asarray(ev["y"]), np.asarray(ev["logits"])
        for k, c in enumerate(classes):
            assert row["clinical"]["per_class"][c]["test"]["auc"] == pytest.approx(roc_auc_score(y[:, k], z[:, k]))
        macro = roc_auc_score(y, z, average="macro")
        assert row["clinical"]["macro"]["auc"] == pytest.approx(macro)
        assert table.set_index("config_id").loc[cid, "auc"] == pytest.approx(macro)
        meta = json.loads((out / "best" / cid / "model.json").read_text())
        assert meta["temperature"] == row["clinical"]["temperature"] and len(meta["temperature"]) == 3
        assert meta["operating_point"]["threshold"] == row["clinical"]["threshold"]
        assert "logits" not in row["eval"]["test"]  # results.json stays small; the numbers are in clinical
    md = (out / "report" / "REPORT.md").read_text()
    for heading in ("## Discrimination: ROC AUC and average precision", "## Operating point", "## Calibration",
                    "vs best: AUC p", "| macro "):
        assert heading in md
    group = results["rows"][0]["group"]
    assert (out / "report" / "figures" / f"{group}_roc_pr.png").is_file()
    assert (out / "report" / "figures" / f"{group}_reliability.png").is_file()
    # rebuilt from the output folder: the same numbers (eval.json reused, no model run)
    report_mod.build(out, report_mod.load_saved_spec(out))
    again = json.loads((out / "report" / "results.json").read_text())
    assert [r["clinical"] for r in again["rows"]] == [r["clinical"] for r in results["rows"]]
    # predict: temperature-scaled sigmoids, each class at its own threshold
    cid = results["rows"][0]["config_id"]
    ev = json.loads((out / "best" / cid / "eval.json").read_text())["splits"]["test"]
    capsys.readouterr()
    assert predict_mod.main([str(out / "best" / cid), str(out / "synthetic-data" / "test"),
                             "--csv", str(tmp_path / "p.csv")]) == 0
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    meta = json.loads((out / "best" / cid / "model.json").read_text())
    p = clinical.calibrated(np.asarray(ev["logits"]), "multi", meta["temperature"])
    thresholds = meta["operating_point"]["threshold"]
    for f, pr in zip(ev["files"], p):
        got = np.array([float(rows[f][c]) for c in classes])
        np.testing.assert_allclose(got, pr, atol=1e-4)
        want = "+".join(c for c, v, t in zip(classes, pr, thresholds) if v >= t) or "none"
        assert rows[f]["predicted"] == want
