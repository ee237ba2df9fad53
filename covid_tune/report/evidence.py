"""REPORT.md's clinical sections (issue 29): discrimination (ROC AUC, AP), the operating point, calibration,
per-source AUC; from the ``clinical`` block of each result row (:mod:`covid_tune.results.clinical`)."""

from __future__ import annotations

from tabulate import tabulate

from covid_tune.results import clinical


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_ci(value, ci) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _pct_ci(value, ci) -> str:
    if value is None:
        return "-"
    return pct(value) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


def _evaluated(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("clinical")]


def _class_rows(rows: list[dict]):
    """(row, class name, that class's entry) for every evaluated class of every row."""
    for r in _evaluated(rows):
        for name in r["clinical"]["classes"]:
            yield r, name, r["clinical"]["per_class"][name]


def _class_cell(r: dict, name: str) -> list[str]:
    return [r["config_id"]] + ([name] if r["clinical"]["label_mode"] == "multi" else [])


def _headers(rows: list[dict]) -> list[str]:
    multi = any(r["clinical"]["label_mode"] == "multi" for r in _evaluated(rows))
    return ["config_id"] + (["class"] if multi else [])


def auc_p_cells(comparisons: dict[str, dict], best: str | None) -> dict[str, str]:
    """The "vs best: AUC p" cells per group."""
    def fmt(p):
        return "-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"
    return {g: "best" if g == best else fmt(c["p"]) for g, c in comparisons.items()}


def discrimination_section(rows: list[dict], figs: dict[str, dict[str, str]], best: str | None) -> list[str]:
    """ROC AUC [DeLong 95% CI] and AP [bootstrap 95% CI] on validation and test, per evaluated class
    (and macro, multi-label), with the ROC/PR figures per group."""
    evaluated = _evaluated(rows)
    if not evaluated:
        return []
    first = evaluated[0]["clinical"]
    multi = first["label_mode"] == "multi"
    table = []
    for r, name, e in _class_rows(rows):
        v, t = e["validation"], e["test"]
        table.append(_class_cell(r, name) + [_with_ci(v["auc"], v["auc_ci"]), _with_ci(t["auc"], t["auc_ci"]),
                                             _with_ci(t["ap"], t["ap_ci"]), f"{t['n_pos']}/{t['n']}"])
    if multi:
        for r in evaluated:
            m = r["clinical"]["macro"] or {}
            table.append([r["config_id"], "macro", "-", _with_ci(m.get("auc"), m.get("auc_ci")),
                          _with_ci(m.get("ap"), None), "-"])
    about = ("each class against the others (one sigmoid per class), and their macro mean" if multi else
             f"the positive class `{first['positive']}` against the others (`report.positive`)")
    md = ["## Discrimination: ROC AUC and average precision", "",
          f"Of {about}, scored by the temperature-scaled probability. ROC AUC with DeLong's 95% interval "
          "(midrank algorithm of Sun & Xu 2014); AP (average precision, the area under the precision-recall curve, "
          "whose chance level is the prevalence) with a 95% stratified bootstrap interval (1,000 resamples of "
          "positives and negatives separately)"
          + ("; the macro AUC's interval sums the per-image DeLong terms over the classes (they share images)."
             if multi else "."), "",
          tabulate(table, headers=_headers(rows) + ["Validation AUC [95% CI]", "Test AUC [95% CI]",
                                                    "Test AP [95% CI]", "Test positives/n"],
                   tablefmt="github", disable_numparse=True), "",
          "vs best: AUC p (beside \"vs best: p\" in the accuracy table): paired DeLong test of each configuration's "
          f"test AUC against the best configuration's{f', `{best}`' if best else ''}, on the same images, seed "
          "paired with seed as for McNemar; the statistic is the AUC difference averaged over the seed pairs"
          + (" and classes" if multi else "") + ", its variance summed image by image (so seeds sharing the test "
          "images are not counted as independent).", ""]
    for group, files in figs.items():
        if "roc_pr" in files:
            md += [f"![ROC and PR of {group}]({files['roc_pr']})", ""]
    return md


def operating_point_section(rows: list[dict]) -> list[str]:
    """Sensitivity, specificity, PPV, NPV [exact 95% CI] on test at the threshold chosen on validation."""
    evaluated = _evaluated(rows)
    if not evaluated:
        return []
    first = evaluated[0]["clinical"]
    table = []
    for r, name, e in _class_rows(rows):
        t = e["test"]
        cells = [_pct_ci(t[k], t[f"{k}_ci"]) for k in ("sens", "spec", "ppv", "npv")]
        counts = f"{t['tp']}/{t['fp']}/{t['tn']}/{t['fn']}"
        table.append(_class_cell(r, name) + [f"{e['threshold']:.4f}"] + cells + [counts])
    rule = first["rule"]
    how = {"youden": "the threshold maximising sensitivity + specificity - 1 (Youden's J)"}.get(rule)
    if how is None:
        head, _, x = rule.rpartition("=")
        how = (f"the highest threshold with sensitivity >= {x}" if head == "sensitivity" else
               f"the lowest threshold with specificity >= {x}" if head == "specificity" else f"a fixed threshold {x}")
    return ["## Operating point", "",
            f"`report.operating_point: {rule}`: {how} on the **validation** images' temperature-scaled probabilities; "
            "test never informs it. At that threshold (positive when the probability reaches it), on test: "
            "sensitivity, specificity, PPV and NPV in % with exact (Clopper-Pearson) 95% intervals; PPV and NPV hold "
            "at the test split's prevalence only. `covid-tune predict` decides with the same threshold "
            "(stored in model.json).", "",
            tabulate(table, headers=_headers(rows) + ["Threshold", "Sensitivity", "Specificity", "PPV", "NPV",
                                                      "TP/FP/TN/FN"], tablefmt="github", disable_numparse=True), ""]


def calibration_section(rows: list[dict], figs: dict[str, dict[str, str]]) -> list[str]:
    """Temperature, ECE, Brier and NLL on test before and after temperature scaling; reliability diagrams."""
    evaluated = _evaluated(rows)
    if not evaluated:
        return []
    table = []
    for r, name, e in _class_rows(rows):
        t = e["test"]
        table.append(_class_cell(r, name) + [f"{e['temperature']:.3f}",
                                             f"{t['ece_raw']:.4f} -> {t['ece']:.4f}",
                                             f"{t['brier_raw']:.4f} -> {t['brier']:.4f}",
                                             f"{t['nll_raw']:.4f} -> {t['nll']:.4f}"])
    multi = evaluated[0]["clinical"]["label_mode"] == "multi"
    md = ["## Calibration", "",
          "Do the probabilities mean what they say? One temperature T"
          + (" per class" if multi else "") + " divides the logits, fitted on the validation images only (LBFGS on "
          "the negative log-likelihood); it changes no ranking" + ("" if multi else " of two classes")
          + " and no most-probable class. On test, before -> after scaling: ECE (expected calibration error, "
          "15 equal-width bins of the class's probability: the mean gap between predicted probability and observed "
          "frequency, 0 is perfect), Brier score (mean squared error of the probability) and NLL ("
          + ("binary cross-entropy of the class" if multi else "cross-entropy over all classes") + ").", "",
          tabulate(table, headers=_headers(rows) + ["T", "ECE", "Brier", "NLL"], tablefmt="github",
                   disable_numparse=True), ""]
    for group, files in figs.items():
        if "reliability" in files:
            md += [f"![reliability of {group}]({files['reliability']})", ""]
    return md


def source_auc_table(rows: list[dict]) -> list[str]:
    """Test AUC of the positive class within each source dataset (single-label, with a manifest)."""
    with_sources = [r for r in rows if r.get("auc_by_source")]
    if not with_sources:
        return []
    sources = sorted({s for r in with_sources for s in r["auc_by_source"]})
    first = {s: next(r["auc_by_source"][s] for r in with_sources if s in r["auc_by_source"]) for s in sources}

    def cell(v):
        return "- (one class)" if v is None or v.get("auc") is None else f"{v['auc']:.3f}"
    table = [[r["config_id"]] + [cell(r["auc_by_source"].get(s)) for s in sources] for r in with_sources]
    positive = with_sources[0]["clinical"]["positive"]
    return ["Test ROC AUC of the positive class within each source (`" + positive + "` against the rest): a model "
            "that tells the hospitals apart rather than the disease has a high AUC over all images and a low one "
            "inside each source. \"one class\": the source holds images of one side only, so within it no AUC "
            "exists.", "",
            tabulate(table, headers=["config_id"] + [f"{s} (pos {first[s]['n_pos']}/{first[s]['n']})" for s in sources],
                     tablefmt="github", disable_numparse=True), ""]


def group_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per group, per seed and evaluated class: the test outcomes, scores and threshold (for the figures)."""
    out: dict[str, list[dict]] = {}
    for r in _evaluated(rows):
        for name in r["clinical"]["classes"]:
            scores = clinical.test_scores(r, name)
            if scores is None:
                continue
            y, p = scores
            raw = clinical.test_scores(r, name, scaled=False)[1]
            out.setdefault(r["group"], []).append(
                {"seed": r["seed"], "class": name, "y": y.tolist(), "p": p.tolist(),
                 "threshold": r["clinical"]["per_class"][name]["threshold"], "raw": raw.tolist()})
    return out
