"""REPORT.md's cross-validation section (``data.folds``): per configuration the cross-validated estimate with
its 95% t interval, the pooled out-of-fold accuracy and AUC with theirs, the per-fold table, and how far the
estimate was from the test result (:mod:`covid_tune.results.crossval`)."""

from __future__ import annotations

from tabulate import tabulate

from covid_tune.report.evidence import pct as _pct


def _ci(ci) -> str:
    return "-" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _auc(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _auc_ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def section(cv: dict[str, dict], best: str | None, ensembles: dict[str, dict] | None = None) -> list[str]:
    """The markdown lines (none without fold trials). ``ensembles``: group -> the ensemble's test numbers
    (``acc``, ``acc_ci``, ``auc``, ``auc_ci``, ``members``), compared with the estimate where present."""
    if not cv:
        return []
    ensembles = ensembles or {}
    k = max(c["k"] for c in cv.values())
    rows = []
    for group, c in cv.items():
        oof = c["oof"] or {}
        test = c["test_acc"]  # what the interval estimates: one model's accuracy, so the members' mean
        inside = "-" if test is None or not c["ci"] else ("yes" if c["ci"][0] <= test <= c["ci"][1] else "no")
        rows.append([("**" + group + "**") if group == best else group, _pct(c["estimate"]), _ci(c["ci"]),
                     _pct(oof.get("acc")), _ci(oof.get("acc_ci")), _auc(oof.get("auc")), _auc_ci(oof.get("auc_ci")),
                     _pct(test), "-" if test is None else f"{100 * (test - c['estimate']):+.1f}", inside])
    md = ["## Cross-validation", "",
          f"Train and validation pooled and cut into {k} folds by group; each fold's models trained on the other "
          "folds and were selected and scored on it. CV estimate = mean over folds of the held-out accuracy "
          f"(each fold's: the mean over its seeds), 95% interval mean ± t(K-1, 0.975) · sd / √K. Out-of-fold = "
          "every pooled image predicted once by the models that never trained on it (seeds' probabilities "
          "averaged), exact interval for accuracy, DeLong for AUC. Test = the members' mean test accuracy (the "
          "interval estimates one model's; an ensemble's own numbers are below it); Δ = test − estimate. "
          "Bold: the configuration chosen (best mean "
          "over folds and seeds on validation).", "",
          tabulate(rows, headers=["configuration", "CV acc (%)", "95% CI (%)", "OOF acc (%)", "95% CI (%)",
                                  "OOF AUC", "95% CI", "Test acc (%)", "Δ (points)", "test in CI"],
                   tablefmt="github", disable_numparse=True), ""]
    chosen = cv.get(best) or next(iter(cv.values()))
    name = best if best in cv else next(iter(cv))
    md += [f"Per fold, `{name}`:", "",
           tabulate([[f["fold"], f["n"] if f["n"] is not None else "-", f["seeds"], _pct(f["val_acc"]),
                      _pct(f["test_acc"])] for f in chosen["folds"]],
                    headers=["fold", "held-out images", "seeds", "held-out acc (%)", "test acc (%)"],
                    tablefmt="github", disable_numparse=True), ""]
    if ensembles:
        md += ["### Ensembles", "",
               "One model per configuration that averages its members' probabilities (`best/<group>/ensemble/`), "
               "on the test split, beside its members' mean:", "",
               tabulate([[g, e["members"], _pct(e["acc"]), _ci(e.get("acc_ci")), _auc(e.get("auc")),
                          _auc_ci(e.get("auc_ci")), _pct(e.get("members_acc"))] for g, e in ensembles.items()],
                        headers=["configuration", "members", "Test acc (%)", "95% CI (%)", "Test AUC", "95% CI",
                                 "members' mean acc (%)"], tablefmt="github", disable_numparse=True), ""]
    return md
