"""REPORT.md's search section, when settings were sampled: a parallel-coordinates figure, which
setting mattered (Optuna's fANOVA importance for an optuna search, a random forest's permutation
importance from scikit-learn for a random one) and each grid cell's best sample.

One point per sample (group ``{cell}-n{K}``): its settings and the mean selection score over its seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tabulate import tabulate

from covid_tune.spec.load import Spec
from covid_tune.spec.plan import readable
from covid_tune.spec.sections import INTEGER_AXES, Distribution

FIGURE = "search_parallel.png"


def samples(rows: list[dict], axes: list[str]) -> list[dict]:
    """One entry per sampled group with a score: ``group``, ``cell``, each axis's value, ``score`` (mean
    ``select_score`` over the group's seeds)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("select_score") is None:
            continue
        g = out.setdefault(r["group"], {"group": r["group"], "cell": r["group"].rsplit("-n", 1)[0],
                                        **{a: r.get(a) for a in axes}, "scores": []})
        g["scores"].append(r["select_score"])
    return [{**{k: v for k, v in g.items() if k != "scores"}, "score": float(np.mean(g["scores"]))}
            for g in out.values()]


def _optuna_distribution(axis: str, dist: Distribution):
    import optuna

    if dist.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(dist.args))
    lo, hi = dist.args
    if axis in INTEGER_AXES:
        return optuna.distributions.IntDistribution(int(lo), int(hi), log=dist.kind == "loguniform")
    return optuna.distributions.FloatDistribution(lo, hi, log=dist.kind == "loguniform")


def importance(points: list[dict], dists: dict[str, Distribution], method: str, seed: int = 0) -> dict[str, float]:
    """Each sampled setting's importance for the score (sums to 1 for fANOVA), largest first.

    ``method`` ``fanova``: ``optuna.importance.get_param_importances`` with its ``FanovaImportanceEvaluator``
    over a study made of the samples (``optuna.trial.create_trial``). ``permutation``: scikit-learn's
    ``permutation_importance`` of a ``RandomForestRegressor`` fitted to the samples (log scale for
    loguniform settings, categories as their index), normalized to sum 1 (negative values as 0).
    """
    axes = list(dists)
    if method == "fanova":
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line; restored below
        try:
            study = optuna.create_study(direction="maximize")
            distributions = {a: _optuna_distribution(a, d) for a, d in dists.items()}
            for p in points:
                study.add_trial(optuna.trial.create_trial(params={a: p[a] for a in axes},
                                                          distributions=distributions, value=p["score"]))
            got = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
        finally:
            optuna.logging.set_verbosity(verbosity)
        return {a: float(v) for a, v in got.items()}
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    x = np.array([[_position(p[a], d) for a, d in dists.items()] for p in points], dtype=float)
    y = np.array([p["score"] for p in points], dtype=float)
    forest = RandomForestRegressor(n_estimators=200, random_state=seed).fit(x, y)
    got = permutation_importance(forest, x, y, n_repeats=10, random_state=seed).importances_mean
    got = np.clip(got, 0, None)
    total = got.sum() or 1.0
    return dict(sorted(((a, float(v / total)) for a, v in zip(axes, got)), key=lambda kv: -kv[1]))


def _position(value, dist: Distribution) -> float:
    """A value as a number on its distribution's own scale (log for loguniform, index for a choice)."""
    if dist.kind == "choice":
        return float(dist.args.index(value)) if value in dist.args else float("nan")
    return math.log(float(value)) if dist.kind == "loguniform" else float(value)


def write_figure(path: Path, points: list[dict], dists: dict[str, Distribution], metric: str) -> Path:
    """The parallel-coordinates figure: each sample a line over its settings (scaled to the distribution's
    range, log for loguniform) and the score, coloured by the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(dists)
    scores = np.array([p["score"] for p in points], dtype=float)
    lo_s, hi_s = float(scores.min()), float(scores.max())
    fig, ax = plt.subplots(figsize=(1.8 * (len(axes) + 1) + 2, 4))
    cmap = plt.get_cmap("viridis")
    for p, s in zip(points, scores):
        ys = []
        for a, d in dists.items():
            if d.kind == "choice":
                ys.append(_position(p[a], d) / max(len(d.args) - 1, 1))
            else:
                lo, hi = (_position(v, d) for v in d.args)
                ys.append((_position(p[a], d) - lo) / (hi - lo))
        ys.append((s - lo_s) / (hi_s - lo_s) if hi_s > lo_s else 0.5)
        ax.plot(range(len(ys)), ys, color=cmap(ys[-1]), alpha=0.8)  # coloured by its score's place
    labels = [f"{a}\n{d.text()}" for a, d in dists.items()] + [f"{metric}\n[{lo_s:.3g}, {hi_s:.3g}]"]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    for i in range(len(labels)):
        ax.axvline(i, color="grey", lw=0.5)
    ax.set_title(f"{len(points)} sampled settings (each line one sample, mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def section(spec: Spec, rows: list[dict], fig_dir: Path) -> list[str]:
    """REPORT.md's ``## Search`` lines (none when nothing was sampled)."""
    dists = spec.grid.distributions()
    if not dists:
        (fig_dir / FIGURE).unlink(missing_ok=True)
        return []
    metric, mode = spec.scheduler.metric, spec.scheduler.mode
    points = samples(rows, list(dists))
    md = ["## Search", "",
          f"`search.algorithm: {spec.search.algorithm}`, {spec.search.samples} sample(s) per grid cell, seed "
          f"{spec.search.seed}: " + ", ".join(f"{a} ~ {d.text()}" for a, d in dists.items())
          + f". Each sample scored by its mean `{metric}` selection score over its seeds.", ""]
    if not points:
        return md + ["No sample has a score yet.", ""]
    write_figure(fig_dir / FIGURE, points, dists, metric)
    md += [f"![parallel coordinates](figures/{FIGURE})", ""]
    method = "fanova" if spec.search.algorithm == "optuna" else "permutation"
    if len(points) >= 3 and len({p["score"] for p in points}) > 1:
        imp = importance(points, dists, method, spec.search.seed)
        how = ("Optuna's fANOVA importance (share of the score's variance each setting explains)" if method == "fanova"
               else "permutation importance of a random forest fitted to the samples (scikit-learn), as shares")
        md += ["### Which setting mattered", "",
               tabulate([[a, f"{v:.3f}"] for a, v in imp.items()], headers=["setting", "importance"],
                        tablefmt="github", disable_numparse=True), "",
               f"{how}, over {len(points)} samples of all grid cells together.", ""]
    else:
        md += ["Too few distinct scores for an importance estimate (at least 3 samples needed).", ""]
    best_rows = []
    for cell in dict.fromkeys(p["cell"] for p in points):
        mine = [p for p in points if p["cell"] == cell]
        top = (max if mode == "max" else min)(mine, key=lambda p: p["score"])
        best_rows.append([cell, top["group"].rsplit("-", 1)[-1], *[readable(top[a]) for a in dists],
                          f"{top['score']:.4f}", len(mine)])
    md += ["### Best sample per grid cell", "",
           tabulate(best_rows, headers=["grid cell", "sample", *dists, metric, "samples scored"], tablefmt="github",
                    disable_numparse=True), ""]
    return md
