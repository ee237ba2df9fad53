"""Paired comparisons between configurations on the same test images, and ASHA's cuts in context.

McNemar's exact test: only the images on which two models disagree (one right, the other wrong)
carry information about which is better; under "equally good" each such image is a fair coin, so
the p-value is a two-sided binomial test of the discordant counts (scipy's ``binomtest``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

from covid_tune.results.selection import best_of, top

ALPHA = 0.05  # "indistinguishable from the best" means p >= ALPHA


def mcnemar_exact(a_correct: Sequence[int], b_correct: Sequence[int]) -> dict:
    """Exact McNemar test of two models' per-image 0/1 correctness on the same images (same order).

    Returns ``a_only`` (images only a gets right), ``b_only`` and the two-sided ``p`` (1.0 when
    they never disagree)."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs the same images: {a.shape} vs {b.shape} outcomes")
    return _from_counts(int((a & ~b).sum()), int((~a & b).sum()))


def _from_counts(a_only: int, b_only: int) -> dict:
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def member(row: dict) -> int | str:
    """Which member of its group a row is: its seed, or ``f<fold>-s<seed>`` for a fold trial (data.folds), so
    that seed s of fold f is paired with seed s of fold f."""
    return row["seed"] if row.get("fold") is None else f"f{row['fold']}-s{row['seed']}"


def _test_correct(row: dict) -> list[int] | None:
    return ((row.get("eval") or {}).get("test") or {}).get("correct")


def accuracy_on_test(row: dict) -> float | None:
    """A result row's test accuracy (None where it was not evaluated on test)."""
    acc = ((row.get("eval") or {}).get("test") or {}).get("acc")
    return None if acc is None else float(acc)


def selection_score(row: dict, metric: str) -> float | None:
    """The validation value a configuration was chosen on (its ``select_score``, else the metric at its best epoch)."""
    if row.get("select_score") is not None:
        return float(row["select_score"])
    at = next((h for h in row.get("history") or [] if h.get("epoch") == row.get("best_epoch")), None)
    return None if at is None or at.get(metric) is None else float(at[metric])


def _group_scores(rows: list[dict], metric: str) -> dict[str, list[float]]:
    """Each group's selection scores on validation (its seeds with one), groups in plan order."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        s = selection_score(r, metric) if r.get("group") is not None else None  # the console's rows have none
        if s is not None:
            scores.setdefault(r["group"], []).append(s)
    return scores


def best_group(rows: list[dict], metric: str, mode: str) -> str | None:
    """The group (configuration over its seeds, and folds with data.folds: each fold trial counts as a seed
    does) with the best mean selection score on validation, among
    the groups with a test evaluation (the comparisons need the best's test outcomes).

    Chosen on validation, as the sweep chooses, never on test; the mean is over every seed with a
    validation score, evaluated on test or not (a sweep beyond ``report.top_k`` evaluates only its
    shortlist); ties go to the earlier group."""
    scores = _group_scores(rows, metric)
    tested = {r.get("group") for r in rows if _test_correct(r) is not None}
    return best_of([g for g in scores if g in tested], lambda g: float(np.mean(scores[g])), mode)


def shortlist(rows: list[dict], metric: str, mode: str, k: int) -> list[str]:
    """The config ids REPORT.md details and the sweep evaluates on test (``report.top_k`` = ``k``), in plan order.

    Every configuration when there are at most ``k``; else the best configuration (seed) of each group
    plus the ``k`` best configurations overall, all by the validation score they were selected on (never
    test), ties to the earliest as :func:`~covid_tune.results.selection.best_of` breaks them. With more
    than ``k`` groups, only the ``k`` best groups (by mean score over their seeds, as :func:`best_group`
    ranks them) contribute their best, so the shortlist never exceeds ``2 k``."""
    if len(rows) <= k:
        return [r["config_id"] for r in rows]
    scores = _group_scores(rows, metric)
    groups = top(scores, lambda g: float(np.mean(scores[g])), mode, k)
    if any(r.get("fold") is not None for r in rows):
        # cross-validation: a configuration is its folds x seeds together (its estimate, its ensemble)
        return [r["config_id"] for r in rows if r["group"] in set(groups)]
    members: dict[str, list[dict]] = {}
    for r in rows:
        members.setdefault(r["group"], []).append(r)
    chosen = {best_of(members[g], lambda r: selection_score(r, metric), mode)["config_id"] for g in groups}
    chosen |= {r["config_id"] for r in top(rows, lambda r: selection_score(r, metric), mode, k)}
    return [r["config_id"] for r in rows if r["config_id"] in chosen]


def compare_to_best(rows: list[dict], metric: str, mode: str) -> tuple[str | None, dict[str, dict]]:
    """Each group against the best group on the test images, seed by seed.

    With several seeds, seed s of a group is paired with seed s of the best (the seeds both have);
    the discordant images are summed over those seeds and tested once (a stratified McNemar test:
    it treats the seeds as independent replicates although they share the test images, so with many
    seeds it is somewhat optimistic). Per-seed p-values are kept too. Returns the best group and, per
    group, ``{"p", "a_only", "b_only", "seeds", "per_seed"}`` (a = the group, b = the best).
    """
    best = best_group(rows, metric, mode)
    if best is None:
        return None, {}
    best_by_seed = {member(r): _test_correct(r) for r in rows if r["group"] == best and _test_correct(r) is not None}
    out: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = {member(r): _test_correct(r) for r in rows if r["group"] == group and _test_correct(r) is not None}
        seeds = sorted(set(mine) & set(best_by_seed))
        if not seeds and mine and best_by_seed:
            # no seed in common: pair the lowest seeds of each (still the same test images)
            seeds = [(min(mine), min(best_by_seed))]
        else:
            seeds = [(s, s) for s in seeds]
        if not seeds:
            continue
        per_seed = {f"{s}:{t}" if s != t else str(s): mcnemar_exact(mine[s], best_by_seed[t]) for s, t in seeds}
        pooled = _from_counts(sum(v["a_only"] for v in per_seed.values()), sum(v["b_only"] for v in per_seed.values()))
        out[group] = {**pooled, "seeds": len(seeds), "per_seed": {k: v["p"] for k, v in per_seed.items()}}
    return best, out


def seed_agreement(rows: list[dict]) -> dict[str, dict]:
    """For each group with several seeds: its seeds against each other on the test images (exact
    McNemar per pair of seeds), as the smallest p and the pair it came from. A small p says the seeds
    alone change which images a configuration gets right: the spread a single-seed sweep cannot see."""
    out: dict[str, dict] = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        seeds = {member(r): _test_correct(r) for r in rows if r["group"] == group and _test_correct(r) is not None}
        pairs = [(s, t) for i, s in enumerate(sorted(seeds)) for t in sorted(seeds)[i + 1:]]
        if pairs:
            tests = {(s, t): mcnemar_exact(seeds[s], seeds[t])["p"] for s, t in pairs}
            (s, t), p = min(tests.items(), key=lambda kv: kv[1])
            out[group] = {"min_p": p, "seeds": [s, t], "pairs": len(pairs)}
    return out


def indistinguishable(comparisons: dict[str, dict], best: str | None, alpha: float = ALPHA) -> list[str]:
    """The groups other than the best whose McNemar p-value against it is at least ``alpha``."""
    return [g for g, c in comparisons.items() if g != best and c["p"] >= alpha]


def proportion_ci(acc: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of an accuracy ``acc`` measured on ``n`` images."""
    if not n:
        return (float("nan"), float("nan"))
    k = int(round(acc * n))
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def stopped_rows(rows: list[dict], best: str | None, n_val: int, metric: str) -> list[dict]:
    """For every row ASHA stopped early: where it was cut, its last validation values, and the best's
    validation accuracy (95% exact interval on ``n_val`` images) at that epoch.

    ``verdict`` is "not ruled out" when the stopped row's validation accuracy at the cut lies at or above
    the lower end of that interval (the data could not tell it apart from the best there), else "worse".
    The comparison is on accuracy, whatever metric ASHA cut on: accuracy has an exact interval from
    the epoch's numbers alone."""
    best_rows = {member(r): r for r in rows if r["group"] == best}
    out = []
    for r in rows:
        if not r.get("stopped_early") or not r.get("history"):
            continue
        last = r["history"][-1]
        rung = int(last["epoch"])
        ref = best_rows.get(member(r)) or next(iter(best_rows.values()), None)
        ref_at = next((h for h in (ref or {}).get("history") or [] if h.get("epoch") == rung), None)
        item = {"config_id": r["config_id"], "rung": rung, "metric": metric, "last": last.get(metric),
                "val_acc": last.get("val_acc"), "best_config": ref["config_id"] if ref else None,
                "best_val_acc": None, "best_ci": None, "verdict": "no comparison"}
        if ref is not None and ref["config_id"] == r["config_id"]:
            item["verdict"] = "is the best"
        elif ref_at is not None and ref_at.get("val_acc") is not None and last.get("val_acc") is not None:
            lo, hi = proportion_ci(ref_at["val_acc"], n_val)
            item.update(best_val_acc=ref_at["val_acc"], best_ci=[lo, hi],
                        verdict="not ruled out" if last["val_acc"] >= lo - 1e-9 else "worse")
        out.append(item)
    return out
