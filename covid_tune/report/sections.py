"""REPORT.md's tables and sections, and results.csv's columns, from the result rows (plain text, no files).

:func:`covid_tune.report.build.write_report` puts them together; each section function returns its
Markdown lines (none when the sweep has nothing to show there).
"""

from __future__ import annotations

import math

from tabulate import tabulate

from covid_tune.data.dataset import Duplicates
from covid_tune.engine.losses import LOSS_LABELS
from covid_tune.results import clinical, stats
from covid_tune.results import collect as results_mod
from covid_tune.spec.load import Spec
from covid_tune.spec.plan import readable
from covid_tune.spec.sections import SWEPT_AXES

# test numbers of the positive class (single-label) or macro means (multi-label), results.clinical.headline
CLINICAL_COLUMNS = ["vs_best_auc_p", "auc", "auc_ci_low", "auc_ci_high", "ap", "ap_ci_low", "ap_ci_high", "sens",
                    "spec", "ppv", "npv", "threshold", "ece", "brier", "temperature"]
CSV_COLUMNS = ["sr", "config_id", "group", "backbone", "freeze", "layers", "loss", "seed", "fold", *SWEPT_AXES,
               "epochs_max", "epochs_trained", "best_epoch", "stopped_early", "status", "shortlisted",
               *results_mod.MODE_KEYS,
               "train_acc", "val_acc", "test_acc", "train_f1", "val_f1", "test_f1",
               "test_acc_ci_low", "test_acc_ci_high", "select_score", "vs_best_p", *CLINICAL_COLUMNS,
               "node", "node_ip", "node_id", "checkpoint"]


def paths_line(flat: list[dict]) -> str:
    """Which training paths the configurations took (last epoch trained), as one sentence."""
    names = {"decoded_cache": "decoded-image cache", "feature_cache": "feature cache (frozen prefix run once)",
             "augmented": "augmented training images", "gpu": "GPU", "compiled": "torch.compile"}
    seen = [f for f in flat if f.get("decoded_cache") is not None]
    if not seen:
        return "Training paths: not recorded."
    parts = [f"{name} {sum(int(f[k] or 0) for f in seen)}/{len(seen)}" for k, name in names.items()]
    return "Training paths (configurations, last epoch trained): " + ", ".join(parts) + "."


def flat_row(row: dict) -> dict:
    """A result row reduced to results.csv's columns."""
    out = {k: row.get(k) for k in CSV_COLUMNS}
    ev = row.get("eval") or {}
    for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        out[f"{prefix}_acc"] = ev.get(split, {}).get("acc")
        out[f"{prefix}_f1"] = ev.get(split, {}).get("f1")
    if "validation" not in ev:  # not evaluated (beyond the shortlist): training's validation pass at that epoch
        at = next((h for h in row.get("history") or [] if h.get("epoch") == row.get("best_epoch")), {})
        out["val_acc"], out["val_f1"] = at.get("val_acc"), at.get("val_f1")
    ci = ev.get("test", {}).get("acc_ci95") or [None, None]
    out["test_acc_ci_low"], out["test_acc_ci_high"] = ci
    out["vs_best_p"] = (row.get("vs_best") or {}).get("p")
    out["vs_best_auc_p"] = (row.get("vs_best_auc") or {}).get("p")
    head = clinical.headline(row.get("clinical"))
    for key in ("auc", "ap"):
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = head.pop(f"{key}_ci") or [None, None]
    out.update(head)
    return out


def pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


UNFINISHED = ("interrupted", "incomplete", "not started")  # statuses of a configuration that did not end


def missing_reason(row: dict) -> str:
    """Why a configuration (a result row or its flat row) has no value to show: ``failed``,
    ``interrupted at epoch 4/10``, ``not started`` or ``not evaluated``."""
    status = row.get("status")
    if status == "error":
        return "failed"
    if status == "not started" or (status in UNFINISHED and not row.get("epochs_trained")):
        return "not started"
    if status in UNFINISHED:
        return f"interrupted at epoch {row.get('epochs_trained')}/{row.get('epochs_max')}"
    if row.get("shortlisted") is False:
        return "not shortlisted"
    return "not evaluated"


def missing(row: dict) -> str:
    """A table cell with no value: ``-`` and the reason."""
    return f"- ({missing_reason(row)})"


def interrupted_banner(rows: list[dict]) -> list[str]:
    """REPORT.md's first lines when some configuration did not end (none otherwise)."""
    cut = [r for r in rows if r.get("status") in UNFINISHED]
    if not cut:
        return []
    names = ", ".join(f"`{r['config_id']}` ({missing_reason(r)})" for r in cut)
    return [f"INTERRUPTED: {len(cut)} of {len(rows)} configuration(s) did not finish: {names}. This report covers "
            "only the epochs trained so far; `covid-tune run SPEC --resume` (the same spec and options) "
            "finishes them.", ""]


def _cell(values: list, members: list[dict] | None = None) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return missing(members[0]) if members else "-"
    if len(values) == 1:
        return pct(vals[0])
    mean, std = results_mod.mean_std(vals)
    return f"{pct(mean)} ± {pct(std)}"


def _epochs_cell(rows: list[dict]) -> str:
    return " / ".join(f"{r['epochs_trained']}{'*' if r['stopped_early'] else ''}" for r in rows)


def metric_table(flat: list[dict], key: str, show_loss: bool = True, vs_best: dict[str, str] | None = None,
                 vs_best_auc: dict[str, str] | None = None) -> str:
    """One course-style table (Sr #, Backbone, Layers, Loss, [varied trainer settings], Epochs, Train,
    Validation, Test[, vs best: p]).

    Rows that differ only in seed are one row: mean ± std (sample std) over the seeds. ``vs_best``
    (group -> cell) adds the paired test against the best configuration, ``vs_best_auc`` the paired DeLong test.
    """
    groups: dict[str, list[dict]] = {}
    for r in flat:
        groups.setdefault(r["group"], []).append(r)
    axes = [a for a in SWEPT_AXES if len({r.get(a) for r in flat}) > 1]
    lines = []
    for sr, members in enumerate(groups.values(), 1):
        first = members[0]
        cells = [sr, first["backbone"], first["layers"]]
        cells += [LOSS_LABELS.get(first["loss"], first["loss"])] if show_loss else []
        cells += [readable(first[a]) for a in axes]
        cells += [_epochs_cell(members)]
        cells += [_cell([m[f"{p}_{key}"] for m in members], members) for p in ("train", "val", "test")]
        cells += [vs_best.get(first["group"], "-")] if vs_best is not None else []
        cells += [vs_best_auc.get(first["group"], "-")] if vs_best_auc is not None else []
        lines.append(cells)
    headers = (["Sr #", "Backbone", "Layers"] + (["Loss"] if show_loss else []) + axes
               + ["Epochs", "Train", "Validation", "Test"])
    headers += ["vs best: p"] if vs_best is not None else []
    headers += ["vs best: AUC p"] if vs_best_auc is not None else []
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def asha_text(spec: Spec) -> str:
    s = spec.scheduler
    grace = (", ".join(f"{lv} {g}" for lv, g in s.grace_period.items()) if isinstance(s.grace_period, dict)
             else s.grace_period)
    text = f"ASHA (grace period {grace}, reduction factor {s.reduction_factor:g}"
    text += f", {s.brackets} brackets" if s.brackets > 1 else ""
    text += f", no cut after epoch {s.max_t}" if s.max_t and s.max_t < spec.trainer.epochs else ""
    return text + ")"


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_cells(comparisons: dict[str, dict], best: str | None) -> dict[str, str]:
    return {g: "best" if g == best else _fmt_p(c["p"]) for g, c in comparisons.items()}


def comparison_line(rows: list[dict], comparisons: dict[str, dict], best: str | None, metric: str) -> str:
    """Which configurations the test split cannot tell apart from the best."""
    if best is None:
        return "vs best: no configuration has a test evaluation to compare."
    same = stats.indistinguishable(comparisons, best)
    seeds = max((c["seeds"] for c in comparisons.values()), default=1)
    how = (f"seed by seed over {seeds} seeds, discordant images summed" if seeds > 1 else "one seed each")
    names = ", ".join(f"`{g}`" for g in same) if same else "none"
    line = (f"vs best: exact McNemar test of each configuration against the best, `{best}` (best mean "
            f"`{metric}` on validation, as chosen), on the same test images ({how}). Statistically "
            f"indistinguishable from the best at p >= {stats.ALPHA:g}: {names}.")
    spread = stats.seed_agreement(rows)
    if spread:
        line += (" Seeds of one configuration against each other (smallest McNemar p over its seed pairs): "
                 + ", ".join(f"`{g}` {_fmt_p(v['min_p'])}" for g, v in spread.items()) + ".")
    return line


def stopped_section(stopped: list[dict], total: int | None = None) -> list[str]:
    """Every row ASHA cut (of the shortlist: ``total`` counts all): where, its last validation values, and
    whether the best was clearly ahead then."""
    others = (total or len(stopped)) - len(stopped)
    more = ([f"{others} more configuration(s) beyond the shortlist were cut by ASHA: results.json's `stopped` "
             "lists each.", ""] if others > 0 else [])
    if not stopped:
        return ["## Stopped early by ASHA", "", *more] if more else []
    metric = stopped[0]["metric"]
    extra = metric != "val_acc"  # the last value of the metric ASHA cut on, when it is not accuracy
    table = [[s["config_id"], s["rung"]] + ([f"{s['last']:.4g}" if s["last"] is not None else "-"] if extra else [])
             + [pct(s["val_acc"]), (f"{pct(s['best_val_acc'])} [{pct(s['best_ci'][0])}, {pct(s['best_ci'][1])}]"
                                     if s["best_ci"] else "-"), s["verdict"]] for s in stopped]
    headers = (["config_id", "Cut at epoch"] + ([f"Last {metric}"] if extra else [])
               + ["Last val acc (%)", "Best's val acc there (%) [95% CI]", "Verdict"])
    return ["## Stopped early by ASHA", "",
            tabulate(table, headers=headers, tablefmt="github", disable_numparse=True), "",
            "Each configuration ASHA stopped, at the epoch (rung) where it was cut, beside the best configuration's "
            "validation accuracy at that epoch (same seed) with its 95% exact (Clopper-Pearson) interval. "
            "\"not ruled out\": its validation accuracy there lies inside or above that interval, so the cut was "
            "a bet, not evidence that it is worse; \"worse\": below the interval.", "", *more]


def per_class_table(rows: list[dict], classes: list[str]) -> list[str]:
    """Test F1 of each class, per configuration."""
    table = [[r["config_id"]] + [pct(f) for f in r["eval"]["test"]["f1_per_class"]] for r in rows if r.get("eval")]
    if not table:
        return []
    return ["## Per-class F1 on the test split", "",
            tabulate(table, headers=["config_id"] + [f"{c} (%)" for c in classes], tablefmt="github",
                     disable_numparse=True), ""]


def source_table(rows: list[dict]) -> list[str]:
    """Per-source test accuracy (when the data has a manifest with ``source_dataset``)."""
    with_sources = [r for r in rows if r.get("test_by_source")]
    if not with_sources:
        return []
    sources = sorted({s for r in with_sources for s in r["test_by_source"]})
    counts = {s: next(r["test_by_source"][s]["n"] for r in with_sources if s in r["test_by_source"]) for s in sources}
    table = [[r["config_id"]] + [pct(r["test_by_source"].get(s, {}).get("acc")) for s in sources] for r in with_sources]
    return ["## Test accuracy by source dataset", "",
            "Source and class can be confounded (see the data's README): a model may recognise the source "
            "rather than the disease. Accuracy in % of the best checkpoint on each source's test images.", "",
            tabulate(table, headers=["config_id"] + [f"{s} (n={counts[s]})" for s in sources], tablefmt="github",
                     disable_numparse=True), ""]


def shortcut_section(rows: list[dict], label_mode: str) -> list[str]:
    """The shortcut check: test accuracy as is, lungs hidden, lungs only; Grad-CAM mass in the box; flags."""
    checked = [r for r in rows if r.get("shortcut")]
    if not checked:
        return []
    first = checked[0]["shortcut"]
    box = f"{100 * first['box_width']:.0f}% wide x {100 * first['box_height']:.0f}% high"
    table, flagged = [], []
    for r in checked:
        c = r["shortcut"]
        mass = c.get("cam_mass_inside")
        table.append([r["config_id"], pct(c["acc_plain"]), pct(c["acc_hidden"]), pct(c["acc_hidden_ci_low"]),
                      pct(c["acc_lungs_only"]), pct(c["majority_rate"]), "-" if mass is None else pct(mass),
                      "**yes**" if c["flagged"] else "no"])
        if c["flagged"]:
            flagged.append(r["config_id"])
    acc = "accuracy" if label_mode == "single" else "exact-match accuracy"
    md = ["## Shortcut check: is the model reading the lungs?", "",
          f"Test {acc} in % of each best checkpoint on the evaluation crops as they are, with the lung field "
          f"(a central box, {box}) filled with each image's mean (lungs hidden), and with only that box kept (border "
          "filled). Majority = always answering the most frequent test class. Grad-CAM in box = mean share of the "
          f"Grad-CAM map's mass inside the box over the Grad-CAM sample below (a flat map gives "
          f"{100 * first['box_width'] * first['box_height']:.0f}%). A model is flagged when the lower end of the 95% "
          f"Clopper-Pearson interval of its accuracy with the lungs hidden is more than {100 * first['margin']:.0f} "
          "points above the majority rate: it then classifies images whose lungs it cannot see, from something "
          "else (text, markers, borders, patient position; DeGrave et al., Nat. Mach. Intell. 2021).", "",
          tabulate(table, headers=["config_id", "As is", "Lungs hidden", "hidden: 95% CI low", "Lungs only",
                                   "Majority", "Grad-CAM in box", "Flagged"], tablefmt="github", disable_numparse=True),
          ""]
    if flagged:
        md += [f"**Shortcut warning**: {len(flagged)} of {len(checked)} model(s) stay far above the majority-class "
               f"rate with the lungs hidden ({', '.join(f'`{c}`' for c in flagged)}): they read something other "
               "than the lungs. Their test accuracy does not show that they detect disease.", ""]
    else:
        md += ["No model stays far above the majority-class rate with the lungs hidden.", ""]
    return md


def duplicates_lines(checks: dict | None) -> list[str]:
    """REPORT.md's line on images shared across splits (``data-checks.json``); none without the record."""
    d = (checks or {}).get("duplicates")
    if not d:
        return []
    dups = Duplicates.from_dict(d)
    if not dups.total:
        return ["", "Duplicates across splits: none (decoded pixels compared)."]
    effect = {"warn": "kept (`data.on_duplicate: warn`): validation and test scores include images the models "
                      "trained on",
              "drop": "removed from the later split before training (`data.on_duplicate: drop`); the counts "
                      "above are after removal"}.get(dups.action, f"`data.on_duplicate: {dups.action}`")
    examples = "; ".join(f"`{e}`" if " = " in e else e for e in dups.examples(2))
    return ["", f"**Duplicates across splits** (identical decoded pixels): {dups.summary()}; {effect}. "
                f"E.g. {examples}."]


def shortlist_note(n_listed: int, n_all: int, top_k: int) -> list[str]:
    """The line saying that the sections below detail a shortlist (none when they show every configuration)."""
    if n_listed >= n_all:
        return []
    return [f"**Shortlist**: the tables and figures below detail {n_listed} of {n_all} configurations: each "
            f"group's best on validation plus the {top_k} best overall (`report.top_k: {top_k}`), chosen on "
            "validation only; only they were evaluated on test (docs/outputs.md says why). A group's mean ± std "
            "is over its shortlisted seeds. Every configuration is in \"All configurations\" below and in "
            "results.csv / results.json.", ""]


def all_configurations_table(flat: list[dict], metric: str) -> list[str]:
    """One compact row per configuration (validation only: test is evaluated for the shortlist alone); none
    when every configuration is shortlisted."""
    if all(f.get("shortlisted") is not False for f in flat):
        return []
    table = [[f["sr"], f["config_id"], f"{f['epochs_trained']}{'*' if f['stopped_early'] else ''}",
              "-" if f["best_epoch"] is None else f["best_epoch"],
              "-" if f["select_score"] is None else f"{f['select_score']:.4g}", pct(f["val_acc"]),
              "yes" if f.get("shortlisted") is not False else ("-" if f["status"] == "ok" else missing_reason(f))]
             for f in flat]
    return ["## All configurations", "",
            tabulate(table, headers=["Sr #", "config_id", "Epochs", "Best epoch", f"Score ({metric})",
                                     "Val acc (%)", "Shortlisted"], tablefmt="github", disable_numparse=True), "",
            f"Every configuration of the grid, validation only: epochs trained (`*` = stopped early by ASHA), the "
            f"selected epoch, its selection score (`{metric}`) and validation accuracy in %. Shortlisted = "
            "detailed above and evaluated on test.", ""]
