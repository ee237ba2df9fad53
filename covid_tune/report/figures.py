"""Report figures: loss and accuracy curves per configuration, test confusion matrices.

Each PNG carries a digest of what it shows (its data and title, in the PNG's Description text):
a figure whose digest matches is not drawn again. The sweep draws a configuration's figures as
soon as its trial is evaluated, while other trials train, and the report then finds them current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from covid_tune.engine.files import MODEL_META
from covid_tune.spec.plan import readable

FIGURE_VERSION = 1  # part of every digest: bump it when the drawing changes, so old files are redrawn


def _digest(*content) -> str:
    return hashlib.sha256(json.dumps([FIGURE_VERSION, *content], sort_keys=True, default=str).encode()).hexdigest()


def _current(path: Path, digest: str) -> bool:
    """Whether ``path`` is a PNG already showing exactly what ``digest`` describes."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.text.get("Description") == digest
    except (OSError, ValueError):
        return False


def _curve(path: Path, history: list[dict], key: str, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    digest = _digest("curve", title, epochs, [[h[f"{s}_{key}"] for h in history] for s in ("train", "val")])
    if _current(path, digest):
        return
    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=80)
    for split, style in (("train", "-o"), ("val", "-s")):
        ax.plot(epochs, [h[f"{split}_{key}"] for h in history], style, ms=3,
                label="train" if split == "train" else "validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def _matrix(ax, cm: np.ndarray, xlabels: list[str], ylabels: list[str], title: str) -> None:
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=8)


def _confusion(path: Path, confusion: list, classes: list[str], label_mode: str, title: str) -> None:
    cm = np.asarray(confusion)
    digest = _digest("confusion", title, cm.tolist(), classes, label_mode)
    if _current(path, digest):
        return
    if label_mode == "single":
        fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(classes), 3.0 + 0.3 * len(classes)), dpi=80)
        _matrix(ax, cm, classes, classes, title)
    else:  # one 2x2 matrix per class, scikit-learn's multilabel_confusion_matrix layout
        fig, axes = plt.subplots(1, len(classes), figsize=(2.8 * len(classes), 3.0), dpi=80)
        for ax, c, m in zip(np.atleast_1d(axes), classes, cm):
            _matrix(ax, m, [f"not {c}", c], [f"not {c}", c], c)
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def write_figures(fig_dir: Path, rows: list[dict], classes: list[str], label_mode: str) -> dict[str, dict[str, str]]:
    """Per configuration: ``<id>_loss.png``, ``<id>_acc.png``, ``<id>_confusion.png`` (test split) and,
    for multi-label tasks, ``<id>_confusion_train.png`` and ``<id>_confusion_validation.png``.

    Each row needs ``config_id``, ``history``, ``eval`` and ``best_epoch``; current files are kept."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    for row in rows:
        cid, files = row["config_id"], {}
        if row["history"]:
            for key, label in (("loss", "loss"), ("acc", "accuracy")):
                _curve(fig_dir / f"{cid}_{key}.png", row["history"], key, f"{cid}: {label}")
                files[key] = f"figures/{cid}_{key}.png"
        # single-label: the test matrix; multi-label: per-class 2x2 matrices for every split
        splits = ("test",) if label_mode == "single" else ("train", "validation", "test")
        for split in splits:
            ev = (row.get("eval") or {}).get(split)
            if ev:
                key = "confusion" if split == "test" else f"confusion_{split}"
                _confusion(fig_dir / f"{cid}_{key}.png", ev["confusion"], classes, label_mode,
                           f"{cid}: {split} confusion (epoch {row['best_epoch']})")
                files[key] = f"figures/{cid}_{key}.png"
        written[cid] = files
    return written


def markdown(figs: dict[str, dict[str, str]], rows: list[dict], axes: tuple[str, ...] = ()) -> list[str]:
    """REPORT.md's figure section: curves and confusion matrix of each configuration.

    Each heading names backbone, layers, loss, the trainer settings ``axes`` (those that vary) and seed."""
    lines = ["## Curves and confusion matrices", ""]
    for row in rows:
        files = figs.get(row["config_id"], {})
        if not files:
            continue
        settings = "".join(f", {a} {readable(row[a])}" for a in axes)
        lines += [f"### {row['sr']}. {row['backbone']}, {row['layers']}, {row['loss']}{settings}, "
                  f"seed {row['seed']}", ""]
        order = ("loss", "acc", "confusion_train", "confusion_validation", "confusion")
        lines += [" ".join(f"![{k}]({files[k]})" for k in order if k in files), ""]
    return lines


# --- Grad-CAM ------------------------------------------------------------------------------

def display_crop(path: str, image_size: int, grayscale: bool) -> np.ndarray:
    """The evaluation crop of an image file, unnormalized, as (H, W, 3) floats in [0, 1]."""
    from torchvision import transforms as T

    from covid_tune.data.dataset import load_image

    crop = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)])(load_image(path, grayscale))
    return np.asarray(crop, dtype=np.float32) / 255.0


def cam_tiles(path: Path, crops: list[np.ndarray], maps: list[np.ndarray], titles: list[str], title: str = "",
              ncols: int = 4) -> None:
    """One figure: each crop with its Grad-CAM map overlaid (jet, half transparent) and its title."""
    n = len(crops)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.5 * nrows + 0.3), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, crop, m, t in zip(axes.flat, crops, maps, titles):
        h, w = crop.shape[:2]
        ax.imshow(crop, extent=(0, w, h, 0))
        ax.imshow(np.asarray(m, dtype=np.float32), cmap="jet", alpha=0.45, vmin=0, vmax=np.max(m) or 1,
                  extent=(0, w, h, 0), interpolation="bilinear")
        ax.set_title(t, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    # fixed margins (room for two title lines per tile): tight_layout measured every text first, half
    # the figure's cost, and the report draws one per shortlisted configuration
    top = 1 - (0.55 + (0.3 if title else 0)) / (2.5 * nrows + 0.3)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=top, wspace=0.08, hspace=0.45)
    fig.savefig(path)
    plt.close(fig)


def write_cam_figures(fig_dir: Path, rows: list[dict], classes: list[str]) -> dict[str, str]:
    """``<id>_gradcam.png`` per configuration with a Grad-CAM sample (test images whose files still exist)."""
    import json

    from covid_tune.engine.explain import label_names

    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for row in rows:
        cam = row.get("cam")
        if not cam or not row.get("checkpoint"):
            continue
        meta = json.loads((Path(row["checkpoint"]).parent / MODEL_META).read_text())
        try:
            crops = [display_crop(p, meta["image_size"], meta["grayscale"]) for p in cam["paths"]]
        except OSError:  # the data moved since the sweep: no figure rather than no report
            continue
        titles = [f"true: {classes[t]}\npred: {label_names(p, classes)}" for t, p in zip(cam["labels"], cam["pred"])]
        cid = row["config_id"]
        cam_tiles(fig_dir / f"{cid}_gradcam.png", crops, cam["maps"], titles,
                  f"{cid}: Grad-CAM of the predicted class (test, epoch {row['best_epoch']})")
        written[cid] = f"figures/{cid}_gradcam.png"
    return written


def cam_markdown(cams: dict[str, str], rows: list[dict]) -> list[str]:
    """REPORT.md's Grad-CAM section: one figure per configuration."""
    if not cams:
        return []
    lines = ["## Grad-CAM: where each best checkpoint looks", "",
             "A fixed, seeded sample of test images per class (true and predicted label on each tile), overlaid with "
             "the Grad-CAM map of the predicted class (red = most weight). Maps on the lungs are what a radiologist "
             "would hope for; maps on text, corners or borders suggest a shortcut (see the shortcut check).", ""]
    for row in rows:
        if row["config_id"] in cams:
            lines += [f"### {row['sr']}. {row['config_id']}", "", f"![gradcam]({cams[row['config_id']]})", ""]
    return lines


# --- ROC, PR and reliability (issue 29) -----------------------------------------------------------

def _panels(n: int, width: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.2), dpi=80, squeeze=False)
    return fig, axes[0]


def _roc_pr(path: Path, group: str, curves: list[dict]) -> None:
    """ROC and PR curves of a group's seeds, per evaluated class: chance line, operating point marked."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    digest = _digest("roc_pr", group, curves)
    if _current(path, digest):
        return
    names = list(dict.fromkeys(c["class"] for c in curves))
    fig, axes = _panels(2 * len(names))
    for i, name in enumerate(names):
        roc_ax, pr_ax = axes[2 * i], axes[2 * i + 1]
        prevalence = None
        for c in (c for c in curves if c["class"] == name):
            y, p = np.asarray(c["y"]), np.asarray(c["p"])
            if not 0 < y.sum() < len(y):
                continue
            fpr, tpr, _ = roc_curve(y, p)
            prec, rec, _ = precision_recall_curve(y, p)
            line = roc_ax.plot(fpr, tpr, lw=1.2, label=f"seed {c['seed']}")[0]
            pr_ax.plot(rec, prec, lw=1.2, color=line.get_color())
            pred = p >= c["threshold"]
            sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
            roc_ax.plot([1 - spec], [sens], "o", color=line.get_color(), ms=5)
            if pred.any():
                pr_ax.plot([sens], [y[pred].mean()], "o", color=line.get_color(), ms=5)
            prevalence = y.mean()
        roc_ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
        if prevalence is not None:
            pr_ax.axhline(prevalence, ls=":", color="grey", lw=1, label="chance (prevalence)")
        for ax, (xl, yl, t) in ((roc_ax, ("1 - specificity", "sensitivity", "ROC")),
                                (pr_ax, ("recall (sensitivity)", "precision (PPV)", "PR"))):
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.set_title(f"{t}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
    fig.suptitle(f"{group}: test, dot = operating point (chosen on validation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def _reliability(path: Path, group: str, curves: list[dict], n_bins: int = 15) -> None:
    """Reliability diagrams (observed frequency against mean probability, 15 bins) before and after
    temperature scaling, per evaluated class, every seed of the group."""
    from sklearn.calibration import calibration_curve

    digest = _digest("reliability", group, n_bins, curves)
    if _current(path, digest):
        return
    names = list(dict.fromkeys(c["class"] for c in curves))
    fig, axes = _panels(len(names), width=4.2)
    for ax, name in zip(axes, names):
        for c in (c for c in curves if c["class"] == name):
            y = np.asarray(c["y"])
            if not len(y):
                continue
            frac, mean = calibration_curve(y, np.asarray(c["p"]), n_bins=n_bins)
            line = ax.plot(mean, frac, "-o", ms=3, lw=1.2, label=f"seed {c['seed']}, scaled")[0]
            frac, mean = calibration_curve(y, np.asarray(c["raw"]), n_bins=n_bins)
            ax.plot(mean, frac, "--x", ms=3, lw=0.8, color=line.get_color(), alpha=0.6, label=f"seed {c['seed']}, raw")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"mean predicted probability of {name}", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{group}\ntest reliability, raw and temperature-scaled", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def write_clinical_figures(fig_dir: Path, curves: dict[str, list[dict]]) -> dict[str, dict[str, str]]:
    """Per group (``report.evidence.group_curves``): ``<group>_roc_pr.png`` and ``<group>_reliability.png``."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    for group, items in curves.items():
        _roc_pr(fig_dir / f"{group}_roc_pr.png", group, items)
        _reliability(fig_dir / f"{group}_reliability.png", group, items)
        written[group] = {"roc_pr": f"figures/{group}_roc_pr.png", "reliability": f"figures/{group}_reliability.png"}
    return written


# --- Overview of large sweeps (issue 36) ------------------------------------------------------------

PER_CONFIG_FIGURES = ("loss", "acc", "confusion", "confusion_train", "confusion_validation", "gradcam")
PER_GROUP_FIGURES = ("roc_pr", "reliability")
OVERVIEW_FIGURES = ("overview_validation", "overview_scores")
MAX_PANELS = 12  # more groups than this: one panel for all, the shortlist in colour
MAX_STRIPS = 30  # more groups than this: one histogram of every configuration's score


def remove_stale(fig_dir: Path, config_ids: list[str], groups: list[str]) -> None:
    """Delete the per-configuration figures of ``config_ids`` and the per-group figures of ``groups``
    (those not shortlisted: the sweep draws each trial's curves as it ends, before the shortlist is known)."""
    names = [f"{c}_{k}.png" for c in config_ids for k in PER_CONFIG_FIGURES]
    names += [f"{g}_{k}.png" for g in groups for k in PER_GROUP_FIGURES]
    for name in names:
        (fig_dir / name).unlink(missing_ok=True)


def _val_curves(path: Path, rows: list[dict], metric: str, listed: set[str]) -> None:
    """Validation ``metric`` per epoch of every trial in one figure: a panel per group (up to MAX_PANELS
    groups), else one panel; the shortlisted trials drawn bold."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    curves = {r["config_id"]: (r["group"], [(h["epoch"], h[metric]) for h in r.get("history") or []
                                            if h.get(metric) is not None]) for r in rows}
    digest = _digest("overview_validation", metric, sorted(listed), curves)
    if _current(path, digest):
        return
    groups = list(dict.fromkeys(g for g, _ in curves.values()))
    per_group = len(groups) <= MAX_PANELS
    n = len(groups) if per_group else 1
    ncols = min(4, n)
    nrows = (n + ncols - 1) // ncols
    size = (3.4 * ncols, 2.6 * nrows + 0.4) if per_group else (7.5, 4.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=80, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i, group in enumerate(groups if per_group else [None]):
        ax = axes.flat[i]
        mine = [(c, pts) for c, (g, pts) in curves.items() if group is None or g == group]
        rest = [pts for c, pts in mine if c not in listed and pts]
        # thousands of trials: one collection, not one Line2D each
        ax.add_collection(LineCollection(rest, colors="grey", linewidths=0.6, alpha=0.35))
        if rest:  # where each trial ended (a trial cut after its first epoch is a point, not a line)
            ax.plot([p[-1][0] for p in rest], [p[-1][1] for p in rest], ".", ms=2, color="grey", alpha=0.5)
        colours = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # tab10's grey is the rest's
        shown = [(c, pts) for c, pts in mine if c in listed and pts]
        for j, (c, pts) in enumerate(shown):
            ax.plot(*zip(*pts), "-o", ms=3, lw=1.4, color=colours[j % len(colours)],
                    label=c if not per_group else None)
        ax.autoscale()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{group} ({len(mine)} trials)" if per_group else f"all {len(mine)} trials", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        if not per_group:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="shortlisted",
                      title_fontsize=7)
    fig.suptitle(f"Validation {metric} of every trial (grey); shortlisted in colour", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def _score_spread(path: Path, rows: list[dict], metric: str, listed: set[str]) -> None:
    """The selection score of every configuration per group (a strip per group, up to MAX_STRIPS groups),
    else one histogram of all; shortlisted ones marked."""
    scored = [(r["group"], r["config_id"], r["select_score"]) for r in rows if r.get("select_score") is not None]
    digest = _digest("overview_scores", metric, sorted(listed), scored)
    if _current(path, digest):
        return
    groups = list(dict.fromkeys(g for g, _, _ in scored))
    if len(groups) <= MAX_STRIPS:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(groups) + 2), 3.6), dpi=80)
        jitter = np.random.default_rng(0)
        for i, g in enumerate(groups):
            vals = [(s, c in listed) for gg, c, s in scored if gg == g]
            x = i + jitter.uniform(-0.15, 0.15, len(vals))
            y = np.asarray([v for v, _ in vals])
            mark = np.asarray([m for _, m in vals], dtype=bool)
            ax.plot(x[~mark], y[~mark], "o", ms=3, color="grey", alpha=0.5)
            ax.plot(x[mark], y[mark], "o", ms=5, color="tab:red")
            if len(vals) > 1:
                ax.plot([i - 0.3, i + 0.3], [np.median(y)] * 2, "-", color="black", lw=1.2)
        ax.set_xticks(range(len(groups)), [g if len(g) <= 28 else g[:12] + ".." + g[-14:] for g in groups],
                      rotation=60 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center", fontsize=6)
        ax.set_ylabel(f"selection score ({metric})", fontsize=8)
        ax.set_title("Validation score of each configuration by group\n(bar = median; red = shortlisted)",
                     fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=80)
        values = np.asarray([s for _, _, s in scored])
        ax.hist(values, bins=min(50, max(10, len(values) // 10)), color="grey", alpha=0.7)
        for s in (s for _, c, s in scored if c in listed):
            ax.axvline(s, color="tab:red", lw=0.8)
        ax.set_xlabel(f"selection score ({metric})", fontsize=8)
        ax.set_ylabel("configurations", fontsize=8)
        ax.set_title(f"Validation score of all {len(values)} configurations ({len(groups)} groups)\n"
                     "(red line = shortlisted)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": digest})
    plt.close(fig)


def write_overview_figures(fig_dir: Path, rows: list[dict], metric: str, listed: set[str]) -> dict[str, str]:
    """``overview_validation.png`` and ``overview_scores.png``: two figures whatever the number of trials."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    _val_curves(fig_dir / "overview_validation.png", rows, metric, listed)
    _score_spread(fig_dir / "overview_scores.png", rows, metric, listed)
    return {k: f"figures/{k}.png" for k in OVERVIEW_FIGURES}


def overview_markdown(files: dict[str, str]) -> list[str]:
    """REPORT.md's overview section (sweeps larger than the shortlist)."""
    if not files:
        return []
    return ["## Overview of every trial", "",
            "All trials in two figures: the validation curves of every trial (one panel per group, the "
            "shortlisted bold), and each configuration's selection score by group.", "",
            f"![validation curves]({files['overview_validation']})", "",
            f"![scores by group]({files['overview_scores']})", ""]
