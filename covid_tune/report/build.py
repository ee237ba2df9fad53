"""Results -> report: REPORT.md (accuracy and F1 tables, clinical evidence), results.csv/json and figures.

``covid-tune report OUTPUT`` rebuilds the report of a finished or interrupted sweep
from its output folder, without training (missing test evaluations run locally).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from covid_tune.data.dataset import Duplicates, drop_duplicates, scan_dataset
from covid_tune.engine.files import DATA_CHECKS_FILE, RESULTS_FILE, SPEC_FILE, TRIALS_FILE
from covid_tune.report import cards, evidence, sections
from covid_tune.report import crossval as crossval_report
from covid_tune.report.sections import CSV_COLUMNS, flat_row, metric_table, paths_line
from covid_tune.results import clinical, crossval, ensemble, stats
from covid_tune.results import collect as results_mod
from covid_tune.spec import plan as plan_mod
from covid_tune.spec.load import Spec, SpecError, validate
from covid_tune.spec.sections import SWEPT_AXES


def write_report(out: Path, spec: Spec, rows: list[dict], classes: list[str], counts: dict,
                 data_checks: dict | None = None, sizes: dict[str, int] | None = None,
                 ensembles: dict[str, dict] | None = None) -> Path:
    """Write REPORT.md, results.csv, results.json and figures under ``out/report``. ``counts``: images per
    class and split (multi-label: per label); ``sizes``: images per split (default: the sums of ``counts``,
    right for single-label only)."""
    from covid_tune.report import figures
    from covid_tune.report.search import section as search_section

    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    best, comparisons = stats.compare_to_best(rows, spec.scheduler.metric, spec.scheduler.mode)
    auc_comparisons = clinical.compare_auc_to_best(rows, best)
    for r in rows:
        r["vs_best"] = comparisons.get(r["group"])
        r["vs_best_auc"] = auc_comparisons.get(r["group"])
    cv = crossval.cross_validation(rows)  # data.folds: estimates per configuration ({} without folds)
    ensembles = ensembles or {}
    sizes = sizes if sizes is not None else {s: sum(c.values()) for s, c in counts.items()}
    n_val = sizes.get("validation", 0)
    stopped = stats.stopped_rows(rows, best, n_val, spec.scheduler.metric)
    # beyond report.top_k configurations the sections below detail a shortlist chosen on validation
    short_ids = set(stats.shortlist(rows, spec.scheduler.metric, spec.scheduler.mode, spec.report.top_k))
    for r in rows:
        r["shortlisted"] = r["config_id"] in short_ids
    listed = [r for r in rows if r["shortlisted"]]
    listed_groups = {r["group"] for r in listed}
    listed_comparisons = {g: c for g, c in comparisons.items() if g in listed_groups}
    flat = [flat_row(r) for r in rows]
    flat_listed = [f for f in flat if f["shortlisted"]]
    pd.DataFrame(flat, columns=CSV_COLUMNS).to_csv(report_dir / "results.csv", index=False)
    slim = [{k: v for k, v in r.items() if k not in ("eval", "cam")} | {"eval": _slim_eval(r.get("eval"))}
            | {"cam": {k: v for k, v in (r.get("cam") or {}).items() if k != "maps"} or None} for r in rows]
    (report_dir / "results.json").write_text(json.dumps(
        {"name": spec.name, "data_root": spec.data.root, "classes": classes, "counts": counts,
         "metric": spec.scheduler.metric, "select": spec.scheduler.select, "best_group": best, "alpha": stats.ALPHA,
         "indistinguishable_from_best": stats.indistinguishable(comparisons, best), "stopped": stopped,
         "seed_agreement": stats.seed_agreement(rows), "cross_validation": cv, "ensembles": ensembles,
         "positive": next((r["clinical"]["positive"] for r in rows if r.get("clinical")), None),
         "operating_point": spec.report.operating_point,
         "rows": slim}, indent=1))
    card_paths = cards.write_cards(out, spec, listed, classes, counts, best)
    fig_dir = report_dir / "figures"
    figures.remove_stale(fig_dir, [r["config_id"] for r in rows if not r["shortlisted"]],
                         [g for g in dict.fromkeys(r["group"] for r in rows) if g not in listed_groups])
    figs = figures.write_figures(fig_dir, listed, classes, spec.data.label_mode)
    clinical_figs = figures.write_clinical_figures(fig_dir, evidence.group_curves(listed))
    cams = figures.write_cam_figures(fig_dir, listed, classes)
    overview = (figures.write_overview_figures(fig_dir, rows, spec.scheduler.metric, short_ids)
                if len(listed) < len(rows) else {})
    for name in () if overview else figures.OVERVIEW_FIGURES:  # from a build with a smaller top_k
        (fig_dir / f"{name}.png").unlink(missing_ok=True)

    show_loss = len({r["loss"] for r in flat}) > 1 or spec.data.label_mode == "multi"
    f1_name = "macro F1" if spec.data.label_mode == "single" else "support-weighted F1"
    acc_name = "accuracy" if spec.data.label_mode == "single" else "exact-match accuracy"
    n_seeds = max(Counter(r["group"] for r in flat_listed).values(), default=0)
    md = sections.interrupted_banner(rows) + [f"# {spec.name}", "",
          f"Classes: {', '.join(classes)} ({spec.data.label_mode}-label). Images per split: "
          + "; ".join(f"{s} {n}" for s, n in sizes.items()) + ".",
          *sections.duplicates_lines(data_checks),
          f"Best epoch per configuration chosen by `{spec.scheduler.metric}`"
          + {"best": "", "ema": " smoothed by an EMA (alpha 0.5)", "mean3": " averaged with its neighbouring epochs"}[
              spec.scheduler.select]
          + f"; up to {spec.trainer.epochs} epochs"
          + (", " + sections.asha_text(spec) + "." if spec.scheduler.asha else "."),
          "",
          *sections.shortlist_note(len(listed), len(rows), spec.report.top_k),
          "## Accuracy", "", metric_table(flat_listed, "acc", show_loss, sections.p_cells(listed_comparisons, best),
                                          evidence.auc_p_cells(auc_comparisons, best) if auc_comparisons else None), "",
          sections.comparison_line(listed, listed_comparisons, best, spec.scheduler.metric), "",
          "## F1-score", "", metric_table(flat_listed, "f1", show_loss), "",
          f"Values in %: {acc_name} and {f1_name} of each configuration's best checkpoint, evaluated once on "
          "each split without augmentation. Epochs = epochs trained; `*` = stopped early by ASHA."
          + (f" Several seeds: mean ± sample std over {n_seeds} seeds." if n_seeds > 1 else ""),
          "", paths_line(flat), ""]
    md += search_section(spec, rows, fig_dir)
    pct = sections.pct
    ci_rows = [[f["config_id"], pct(f["test_acc"]), f"[{pct(f['test_acc_ci_low'])}, {pct(f['test_acc_ci_high'])}]",
                (r.get("eval") or {}).get("test", {}).get("n", "-")] if f["test_acc"] is not None
               else [f["config_id"], sections.missing(f), "-", "-"] for f, r in zip(flat, rows) if f["shortlisted"]]
    md += ["## Test accuracy, 95% bootstrap confidence interval", "",
           tabulate(ci_rows, headers=["config_id", "Test acc (%)", "95% CI (%)", "n"], tablefmt="github",
                    disable_numparse=True), ""]
    md += crossval_report.section(cv, best, ensembles)
    md += evidence.discrimination_section(listed, clinical_figs, best)
    md += evidence.operating_point_section(listed)
    md += evidence.calibration_section(listed, clinical_figs)
    md += sections.stopped_section([s for s in stopped if s["config_id"] in short_ids], len(stopped))
    md += sections.per_class_table(listed, classes)
    md += sections.source_table(listed)
    md += evidence.source_auc_table(listed)
    md += sections.shortcut_section(listed, spec.data.label_mode)
    problems = [r for r in flat if r["status"] not in ("ok",)]
    if problems:
        md += ["## Incomplete configurations", ""]
        md += [f"- `{r['config_id']}`: " + ("error" if r["status"] == "error" else sections.missing_reason(r))
               for r in problems] + [""]
    md += cards.markdown(out, card_paths)
    md += figures.overview_markdown(overview)
    md += figures.markdown(figs, listed, tuple(a for a in SWEPT_AXES if len({r.get(a) for r in flat}) > 1))
    md += figures.cam_markdown(cams, listed)
    md += sections.all_configurations_table(flat, spec.scheduler.metric)
    (report_dir / "REPORT.md").write_text("\n".join(md) + "\n")
    return report_dir / "REPORT.md"


def _slim_eval(ev: dict | None) -> dict | None:
    """The evaluation without per-image outputs, except the test split's 0/1 outcomes (paired tests need
    them); the numbers made of the outputs are in each row's ``clinical``."""
    if not ev:
        return None
    return {s: {k: v for k, v in m.items() if k not in ("probs", "files", "logits", "y")
                and (k != "correct" or s == "test")}
            for s, m in ev.items()}


def load_rows(out: Path) -> list[dict]:
    """The result rows of ``out/report/results.json`` (history, status, test metrics per configuration)."""
    return json.loads((out / RESULTS_FILE).read_text())["rows"]


def save_spec(out: Path, spec: Spec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(spec.model_dump_json(indent=2))


def save_data_checks(out: Path, duplicates) -> None:
    """Record the data checks (a :class:`~covid_tune.data.dataset.Duplicates`, or None when none ran) in the output."""
    if duplicates is not None:
        (out / DATA_CHECKS_FILE).write_text(json.dumps({"duplicates": duplicates.to_dict()}, indent=1))


def load_data_checks(out: Path) -> dict | None:
    """``data-checks.json`` of an output folder; None when absent or unreadable (older sweeps)."""
    try:
        return json.loads((out / DATA_CHECKS_FILE).read_text())
    except (OSError, ValueError):
        return None


def load_saved_spec(out: Path) -> Spec:
    """The spec saved in ``out/spec.json``, its paths rebased onto ``out``: the output itself, and Tune's
    storage and the data where they lived under the folder it was written in. A copied or moved output
    folder thus reads its own trials, never the original's (spec.json stores absolute paths)."""
    path = out / SPEC_FILE
    if not path.is_file():
        raise SpecError(f"{out} is not a covid_tune output folder (no {SPEC_FILE})")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise SpecError(f"{path} is not valid JSON: {exc}") from None
    return validate(rebase(raw, out))


def rebase(raw: dict, out: Path) -> dict:
    """A raw saved spec with ``output`` set to ``out``, and ``ray.storage_path`` and ``data.root`` moved along
    where they were inside the old output folder (other paths, e.g. a data tree elsewhere, are kept)."""
    if not isinstance(raw, dict) or not raw.get("output"):
        return raw
    old, out = Path(raw["output"]), Path(out).resolve()
    raw = {**raw, "output": str(out)}
    for section, key in (("ray", "storage_path"), ("data", "root")):
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and "://" not in value and Path(value).is_relative_to(old):
            raw[section] = {**raw[section], key: str(out / Path(value).relative_to(old))}
    return raw


def dataset_root(spec: Spec) -> Path:
    """The data folder of a spec: its root, or the synthetic data written under the output."""
    return Path(spec.data.root) if spec.data.root else spec.output_dir / "synthetic-data"


def label_table(spec: Spec):
    """The spec's ``data.labels`` + ``data.columns`` as a :class:`~covid_tune.data.table.LabelTable` (None
    for an ImageFolder tree or synthetic data)."""
    from covid_tune.data.table import LabelTable

    if spec.data.labels is None:
        return None
    csv_path, c, f = Path(spec.data.labels), spec.data.columns, spec.data.splits
    return LabelTable(csv=csv_path, root=Path(spec.data.root) if spec.data.root else csv_path.parent,
                      path=c.path, label=c.label, labels=tuple(c.labels or ()), separator=c.separator,
                      patient=c.patient, split=c.split, classes=tuple(c.classes or ()),
                      fractions=(f.train, f.validation, f.test), seed=f.seed)


def scan_data(spec: Spec, on_bad_file: str | None = None, verify: bool = True):
    """The spec's data scanned and checked: an ImageFolder tree, or a label table (split by patient when
    it has no split column). Raises :class:`~covid_tune.data.dataset.DatasetError`."""
    from covid_tune.data.table import scan_table

    on_bad_file = on_bad_file or spec.data.on_bad_file
    table = label_table(spec)
    if table is not None:
        return scan_table(table, spec.data.class_map, on_bad_file, verify)
    return scan_dataset(dataset_root(spec), spec.data.class_map, on_bad_file, verify)


def sweep_index(spec: Spec, checks: dict | None = None):
    """The data a sweep used, read again: the scanned tree less the duplicates that ``data.on_duplicate:
    drop`` removed (as recorded in ``data-checks.json``)."""
    index = scan_data(spec)
    dups = (checks or {}).get("duplicates")
    if dups and dups.get("action") == "drop":
        index = drop_duplicates(index, Duplicates.from_dict(dups))
    return add_folds(spec, index)


def add_folds(spec: Spec, index):
    """``index`` with its cross-validation folds (``data.folds``; the index as it is without). Raises
    :class:`~covid_tune.data.folds.FoldError` (a ValueError) for a group that crosses into test."""
    if not spec.data.folds:
        return index
    from covid_tune.data.folds import with_folds

    return with_folds(index, spec.data.folds, spec.data.group_by, spec.data.fold_seed)


def build(out: Path, spec: Spec, evaluator: results_mod.Evaluator | None = None, index=None) -> Path:
    """Collect trials, export and evaluate best checkpoints (default: here, with the spec's ``report``
    settings), write the report. Returns REPORT.md."""
    if evaluator is None:
        def evaluator(dirs, idx):
            return results_mod.evaluate_locally(dirs, idx, spec.report.model_dump())
    plan = plan_mod.expand(spec)
    checks = load_data_checks(out)
    if index is None:
        index = sweep_index(spec, checks)
    if spec.remote_storage:
        results_mod.download_experiment(spec)
    trials_path = out / TRIALS_FILE
    status = json.loads(trials_path.read_text()) if trials_path.is_file() else None
    rows = results_mod.assemble(spec.experiment_dir, plan, index, spec.scheduler.metric, spec.scheduler.mode,
                                out / "best", status, evaluator, rule=spec.scheduler.select, asha=spec.scheduler.asha,
                                top_k=spec.report.top_k)
    ensembles = {}
    best = stats.best_group(rows, spec.scheduler.metric, spec.scheduler.mode)
    target = ensemble.export_ensemble(rows, best, spec.report.ensemble, out / "best")
    if target is not None:  # the chosen configuration as one model, evaluated as any exported model is
        ev = evaluator([target], index)[0]
        results_mod.store_operating_point(target, ev.get("clinical"))
        ensembles[best] = ensemble.summary(ev, ensemble.members(rows, best, spec.report.ensemble))
    return write_report(out, spec, rows, index.classes, index.counts(), checks,
                        sizes={s: len(items) for s, items in index.splits.items()}, ensembles=ensembles)
