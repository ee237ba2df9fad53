"""The evidence a clinical reader asks for: ROC AUC and average precision with intervals, an operating
point chosen on validation, calibration (ECE, Brier, NLL) before and after temperature scaling.

Everything is "one class against the rest": the positive class of a single-label task
(``report.positive``), every class of a multi-label task. Scores are the probabilities after temperature
scaling (the ones ``covid-tune predict`` prints); the temperature and the threshold are fitted on
validation only, then applied to test.

scikit-learn computes the curves, AUC, AP and Brier score; written here: DeLong's variance (fast midrank
version, Sun & Xu, IEEE SPL 2014), the stratified bootstrap of AP, ECE, and the temperature fit (torch).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_softmax
from scipy.stats import binomtest, norm, rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from covid_tune.spec.sections import check_rule

ECE_BINS = 15
AP_BOOTSTRAP = 1000
LEVEL = 0.95


# --- DeLong -------------------------------------------------------------------------------------

def auc_influence(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    """ROC AUC of scores ``s`` for 0/1 labels ``y`` and each image's share of its DeLong variance.

    DeLong's structural components come from midranks (Sun & Xu): for a positive, the fraction of
    negatives scored below it (ties half), V10; for a negative, the fraction of positives above it, V01.
    ``psi`` holds (V10 - AUC) / sqrt(m (m - 1)) at positives and (V01 - AUC) / sqrt(n (n - 1)) at
    negatives, so ``sum(psi**2)`` is DeLong's variance S10/m + S01/n and, for two models on the same
    images, ``sum((psi_a - psi_b)**2)`` their paired difference's variance. NaN without two of each class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=float)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return float("nan"), np.full(len(s), np.nan)
    tz = rankdata(np.concatenate([pos, neg]))  # midranks of all scores
    v10 = (tz[:m] - rankdata(pos)) / n
    v01 = 1.0 - (tz[m:] - rankdata(neg)) / m
    auc = float(v10.mean())
    psi = np.empty(len(s))
    psi[y] = (v10 - auc) / math.sqrt(m * (m - 1)) if m > 1 else np.nan
    psi[~y] = (v01 - auc) / math.sqrt(n * (n - 1)) if n > 1 else np.nan
    return auc, psi


def auc_ci(auc: float, psi: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """DeLong's normal interval of an AUC from its :func:`auc_influence` terms, clipped to [0, 1]."""
    se = math.sqrt(float(np.sum(psi ** 2)))
    if math.isnan(se) or math.isnan(auc):
        return None
    z = norm.ppf(0.5 + level / 2)
    return [max(0.0, auc - z * se), min(1.0, auc + z * se)]


def delong_test(terms: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Paired DeLong test of model a against model b on the same images, averaged over ``terms``.

    Each term is ``(y, scores_a, scores_b)`` over the same images (a seed pair, or a class of a
    multi-label task); the statistic is the mean AUC difference, its variance summed image by image
    over the terms, so terms sharing images are not treated as independent. Returns ``diff`` (a - b),
    ``z`` and the two-sided ``p`` (1.0 when the two never differ)."""
    diffs, psis = [], []
    for y, a, b in terms:
        auc_a, psi_a = auc_influence(y, a)
        auc_b, psi_b = auc_influence(y, b)
        diffs.append(auc_a - auc_b)
        psis.append(psi_a - psi_b)
    if not terms or any(math.isnan(d) for d in diffs):
        return {"diff": None, "z": None, "p": None}
    diff = float(np.mean(diffs))
    var = float(np.sum(np.mean(psis, axis=0) ** 2))
    if math.isnan(var):
        return {"diff": diff, "z": None, "p": None}
    if var <= 1e-15:
        return {"diff": diff, "z": 0.0, "p": 1.0}
    z = diff / math.sqrt(var)
    return {"diff": diff, "z": float(z), "p": float(2 * norm.sf(abs(z)))}


# --- average precision: stratified bootstrap ----------------------------------------------------

def _weighted_ap(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's definition) of each row of ``weights`` (B, N) as sample weights."""
    order = np.argsort(-s, kind="mergesort")
    y, s, w = y[order].astype(float), s[order], weights[:, order].astype(float)
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last image of each distinct score
    tp = np.cumsum(w * y, axis=1)[:, ends]
    fp = np.cumsum(w * (1 - y), axis=1)[:, ends]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / (tp + fp))
        recall = tp / tp[:, -1:]
    return np.sum(np.diff(recall, axis=1, prepend=0.0) * precision, axis=1)


def ap_ci(y: np.ndarray, s: np.ndarray, n_boot: int = AP_BOOTSTRAP, level: float = LEVEL,
          seed: int = 0) -> list[float] | None:
    """Percentile interval of AP over a bootstrap that resamples positives and negatives separately
    (each replicate keeps the split's prevalence, as AP depends on it)."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 1:
        return None
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(y)))
    w[:, y] = rng.multinomial(m, np.full(m, 1 / m), size=n_boot)
    w[:, ~y] = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)
    aps = _weighted_ap(y, np.asarray(s, dtype=float), w)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(aps, [tail, 100 - tail])
    return [float(lo), float(hi)]


# --- calibration --------------------------------------------------------------------------------

def ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities ``p`` for 0/1 outcomes ``y``: over ``n_bins``
    equal-width bins (scikit-learn's ``calibration_curve`` binning), the share of images in each bin
    times |observed frequency - mean probability|."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    ids = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p)
    gap = np.bincount(ids, weights=y, minlength=n_bins) - np.bincount(ids, weights=p, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def nll(logits: np.ndarray, y: np.ndarray, label_mode: str, temperature=1.0) -> float:
    """Mean negative log-likelihood of the labels under ``logits / temperature``: cross-entropy over the
    classes (single-label; ``y`` class indices) or binary cross-entropy of one column (multi-label)."""
    z = np.asarray(logits, dtype=float) / np.asarray(temperature, dtype=float)
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    if label_mode == "single":
        return float(-log_softmax(z, axis=1)[np.arange(len(y)), y.astype(int)].mean())
    return float(np.mean(np.logaddexp(0, z) - y * z))


def fit_temperature(logits: np.ndarray, y: np.ndarray, label_mode: str) -> float:
    """One temperature T > 0 minimising the NLL of ``logits / T`` (LBFGS on log T, float64), on
    validation: softmax over the classes (single-label) or one sigmoid column (multi-label, per class).
    1.0 when the labels cannot calibrate anything (no images, one class only)."""
    import torch

    y = np.asarray(y)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return 1.0
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    target = torch.as_tensor(y.astype(np.int64) if label_mode == "single" else y.astype(np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    loss_fn = (torch.nn.functional.cross_entropy if label_mode == "single"
               else torch.nn.functional.binary_cross_entropy_with_logits)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(z / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(1e-2, 1e2))
    # the optimum is never worse than T = 1 on validation; guard against a failed line search
    return t if nll(logits, y, label_mode, t) <= nll(logits, y, label_mode, 1.0) else 1.0


def calibrated(logits: np.ndarray, label_mode: str, temperature) -> np.ndarray:
    """Probabilities of ``logits / temperature``: softmax rows (single) or sigmoids (multi, T per class)."""
    z = np.asarray(logits, dtype=float) / np.asarray(temperature, dtype=float)
    if label_mode == "single":
        return np.exp(log_softmax(z, axis=1))
    return 1.0 / (1.0 + np.exp(-z))


# --- the operating point ------------------------------------------------------------------------

def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str) -> float:
    """The decision threshold (positive when p >= threshold) chosen by ``rule`` on these labels.

    youden: the highest threshold maximising sensitivity + specificity - 1; sensitivity=X: the highest
    threshold whose sensitivity is at least X (the best specificity there); specificity=X: the lowest
    threshold whose specificity is at least X (the best sensitivity there); a number: itself. Call it
    with validation labels only. Labels of one class: 0.5."""
    rule = check_rule(rule)
    head, _, number = rule.rpartition("=")
    if rule != "youden" and not head:
        return float(number)
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    above = float(np.nextafter(np.max(p), np.inf))  # roc_curve's first threshold (nothing positive)
    thr = np.where(np.isfinite(thr), thr, above).astype(float)
    thr[0] = above
    if rule == "youden":
        k = int(np.argmax(tpr - fpr))
    elif head == "sensitivity":
        k = int(np.flatnonzero(tpr >= float(number) - 1e-12)[0])
    else:
        k = int(np.flatnonzero(1 - fpr >= float(number) - 1e-12)[-1])
    return float(thr[k])


def proportion(k: int, n: int, level: float = LEVEL) -> tuple[float | None, list[float] | None]:
    """k/n with its exact (Clopper-Pearson) interval; (None, None) when n is 0."""
    if n == 0:
        return None, None
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return k / n, [float(ci.low), float(ci.high)]


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Counts, sensitivity, specificity, PPV and NPV (each with its exact interval) at ``threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    tn, fn = int((~pred & ~y).sum()), int((~pred & y).sum())
    out: dict = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, n in (("sens", tp, tp + fn), ("spec", tn, tn + fp), ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        out[name], out[f"{name}_ci"] = proportion(k, n)
    return out


# --- one model ----------------------------------------------------------------------------------

def positive_class(classes: list[str], positive: str | None) -> str:
    """The class a single-label task's evidence is about: ``positive`` (checked against ``classes``), else
    the first class that is not ``normal``, else the first."""
    if positive is not None:
        if positive not in classes:
            raise ValueError(f"report.positive: {positive!r} is not a class of the data (allowed: "
                             f"{', '.join(classes)})")
        return positive
    return next((c for c in classes if c.lower() != "normal"), classes[0])


def evaluated_classes(classes: list[str], label_mode: str, positive: str | None) -> list[str]:
    """The classes that get a one-vs-rest evaluation: the positive class, or every class (multi-label)."""
    return [positive_class(classes, positive)] if label_mode == "single" else list(classes)


def class_target(y: np.ndarray, label_mode: str, k: int) -> np.ndarray:
    """0/1 outcomes of class ``k`` from stored targets (class indices, or multi-hot rows)."""
    y = np.asarray(y)
    return (y == k).astype(int) if label_mode == "single" else y[:, k].astype(int)


def _scores_block(y: np.ndarray, p: np.ndarray, p_raw: np.ndarray, threshold: float, seed: int) -> dict:
    y = np.asarray(y).astype(int)
    block: dict = {"n": int(len(y)), "n_pos": int(y.sum())}
    two = 0 < y.sum() < len(y)
    if two:
        auc, psi = auc_influence(y, p)
        block.update(auc=float(roc_auc_score(y, p)), auc_ci=auc_ci(auc, psi),
                     ap=float(average_precision_score(y, p)), ap_ci=ap_ci(y, p, seed=seed))
    else:
        block.update(auc=None, auc_ci=None, ap=None, ap_ci=None)
    block.update(ece=ece(y, p), ece_raw=ece(y, p_raw),
                 brier=float(brier_score_loss(y, p, pos_label=1)) if len(y) else None,
                 brier_raw=float(brier_score_loss(y, p_raw, pos_label=1)) if len(y) else None)
    block.update(at_threshold(y, p, threshold))
    return block


def evaluate_scores(splits: dict[str, dict], classes: list[str], label_mode: str, positive: str | None = None,
                    rule: str = "youden") -> dict:
    """The clinical evidence of one model from its stored ``logits`` and targets ``y`` per split
    (``validation`` and ``test``): temperature(s) and threshold(s) fitted on validation, then per evaluated
    class and split AUC [DeLong CI], AP [bootstrap CI], sensitivity/specificity/PPV/NPV [exact CI] at the
    threshold, ECE and Brier after and before (``_raw``) temperature scaling, and NLL likewise."""
    val, test = splits["validation"], splits["test"]
    names = evaluated_classes(classes, label_mode, positive)
    val_logits, test_logits = np.asarray(val["logits"], dtype=float), np.asarray(test["logits"], dtype=float)
    val_y, test_y = np.asarray(val["y"]), np.asarray(test["y"])
    if label_mode == "single":
        temps = [fit_temperature(val_logits, val_y, label_mode)] if len(val_y) else [1.0]
        temperature = temps[0]
    else:
        temps = [fit_temperature(val_logits[:, k], val_y[:, k], label_mode) for k in range(len(classes))]
        temperature = temps
    probs = {s: calibrated(z, label_mode, temperature) for s, z in (("validation", val_logits), ("test", test_logits))}
    raw = {s: calibrated(z, label_mode, 1.0) for s, z in (("validation", val_logits), ("test", test_logits))}
    targets = {"validation": val_y, "test": test_y}
    per_class, thresholds = {}, []
    for name in names:
        k = classes.index(name)
        yv = class_target(val_y, label_mode, k)
        threshold = choose_threshold(yv, probs["validation"][:, k], rule)  # validation only
        thresholds.append(threshold)
        entry = {"temperature": temps[0] if label_mode == "single" else temps[k], "threshold": threshold}
        for split in ("validation", "test"):
            entry[split] = _scores_block(class_target(targets[split], label_mode, k), probs[split][:, k],
                                         raw[split][:, k], threshold, seed=k)
        if label_mode == "multi":
            for split, z, yy in (("validation", val_logits, val_y), ("test", test_logits, test_y)):
                entry[split]["nll"] = nll(z[:, k], yy[:, k], label_mode, temps[k])
                entry[split]["nll_raw"] = nll(z[:, k], yy[:, k], label_mode)
        else:
            for split, z, yy in (("validation", val_logits, val_y), ("test", test_logits, test_y)):
                entry[split]["nll"] = nll(z, yy, label_mode, temperature)
                entry[split]["nll_raw"] = nll(z, yy, label_mode)
        per_class[name] = entry
    out = {"label_mode": label_mode, "rule": check_rule(rule), "positive": names[0] if label_mode == "single" else None,
           "classes": names, "all_classes": list(classes), "temperature": temperature,
           "threshold": thresholds[0] if label_mode == "single" else thresholds, "per_class": per_class}
    out["macro"] = (_macro(per_class, classes, label_mode, test_logits, test_y, temperature)
                    if label_mode == "multi" else None)
    return out


def _macro(per_class: dict, classes: list[str], label_mode: str, logits: np.ndarray, y: np.ndarray,
           temperature) -> dict:
    """Means over classes of the test numbers; the macro AUC's interval from the per-image DeLong terms
    summed over classes (the classes share images, so their AUCs are not independent)."""
    p = calibrated(logits, label_mode, temperature)
    aucs, psis = [], []
    for name in per_class:
        k = classes.index(name)
        yk = class_target(y, label_mode, k)
        if 0 < yk.sum() < len(yk):
            auc, psi = auc_influence(yk, p[:, k])
            aucs.append(auc)
            psis.append(psi)
    out: dict = {"auc": float(np.mean(aucs)) if aucs else None,
                 "auc_ci": auc_ci(float(np.mean(aucs)), np.mean(psis, axis=0)) if aucs else None,
                 "classes_with_auc": len(aucs)}
    for key in ("ap", "sens", "spec", "ppv", "npv", "ece", "ece_raw", "brier", "brier_raw", "nll", "nll_raw"):
        vals = [e["test"][key] for e in per_class.values() if e["test"].get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def headline(clinical: dict | None) -> dict:
    """The numbers of results.csv: the positive class's test numbers (single-label) or the macro means
    (multi-label, where threshold and temperature are per class and left out)."""
    keys = ("auc", "auc_ci", "ap", "ap_ci", "sens", "spec", "ppv", "npv", "ece", "brier", "threshold", "temperature")
    if not clinical:
        return dict.fromkeys(keys)
    if clinical["label_mode"] == "single":
        test = clinical["per_class"][clinical["positive"]]["test"]
        return {k: test.get(k) for k in keys[:-2]} | {"threshold": clinical["threshold"],
                                                      "temperature": clinical["temperature"]}
    macro = clinical["macro"] or {}
    return {k: macro.get(k) for k in keys[:-2]} | {"threshold": None, "temperature": None}


def test_scores(row: dict, name: str, scaled: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """(0/1 outcomes, probabilities) of class ``name`` on a result row's test images, temperature-scaled
    unless ``scaled`` is false."""
    clinical, test = row.get("clinical"), ((row.get("eval") or {}).get("test") or {})
    if not clinical or "logits" not in test:
        return None
    k = clinical["all_classes"].index(name)
    p = calibrated(np.asarray(test["logits"], dtype=float), clinical["label_mode"],
                   clinical["temperature"] if scaled else 1.0)
    return class_target(np.asarray(test["y"]), clinical["label_mode"], k), p[:, k]


def auc_by_source(y: np.ndarray, p: np.ndarray, sources: list[str]) -> dict[str, dict]:
    """Per source: images, positives and the AUC (None where the source holds one class only)."""
    y, p, src = np.asarray(y).astype(int), np.asarray(p, dtype=float), np.asarray(sources)
    out = {}
    for s in sorted(set(sources)):
        mask = src == s
        ys = y[mask]
        out[s] = {"n": int(mask.sum()), "n_pos": int(ys.sum()),
                  "auc": float(roc_auc_score(ys, p[mask])) if 0 < ys.sum() < len(ys) else None}
    return out


def compare_auc_to_best(rows: list[dict], best: str | None) -> dict[str, dict]:
    """Paired DeLong test of each group against the best group on the test images, seed by seed as the
    McNemar column pairs them (seed s with seed s; no seed in common: the lowest of each), averaged over
    the seeds (and over the classes, multi-label: the macro AUC). Per group ``{"p", "diff", "seeds"}``."""
    def seeds_of(group: str) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["group"] == group and r.get("clinical")
                and "logits" in ((r.get("eval") or {}).get("test") or {})}

    if best is None:
        return {}
    ref = seeds_of(best)
    out: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = seeds_of(group)
        pairs = [(s, s) for s in sorted(set(mine) & set(ref))]
        if not pairs and mine and ref:
            pairs = [(min(mine), min(ref))]
        if not pairs:
            continue
        terms = []
        for s, t in pairs:
            a, b = mine[s], ref[t]
            for name in a["clinical"]["classes"]:
                ya, pa = test_scores(a, name)
                _, pb = test_scores(b, name)
                if 0 < ya.sum() < len(ya):
                    terms.append((ya, pa, pb))
        test = delong_test(terms)
        out[group] = {"p": test["p"], "diff": test["diff"], "seeds": len(pairs)}
    return out
