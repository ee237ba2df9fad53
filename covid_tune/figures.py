"""Report figures: loss and accuracy curves per configuration, test confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _curve(path: Path, history: list[dict], key: str, title: str) -> None:
    epochs = [h["epoch"] for h in history]
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
    fig.savefig(path)
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
    if label_mode == "single":
        fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(classes), 3.0 + 0.3 * len(classes)), dpi=80)
        _matrix(ax, cm, classes, classes, title)
    else:  # one 2x2 matrix per class, scikit-learn's multilabel_confusion_matrix layout
        fig, axes = plt.subplots(1, len(classes), figsize=(2.8 * len(classes), 3.0), dpi=80)
        for ax, c, m in zip(np.atleast_1d(axes), classes, cm):
            _matrix(ax, m, [f"not {c}", c], [f"not {c}", c], c)
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figures(fig_dir: Path, rows: list[dict], classes: list[str], label_mode: str) -> dict[str, dict[str, str]]:
    """Per configuration: ``<id>_loss.png``, ``<id>_acc.png``, ``<id>_confusion.png`` (test split) and,
    for multi-label tasks, ``<id>_confusion_train.png`` and ``<id>_confusion_validation.png``."""
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
        settings = "".join(f", {a} {row[a]:g}" if isinstance(row[a], float) else f", {a} {row[a]}" for a in axes)
        lines += [f"### {row['sr']}. {row['backbone']}, {row['layers']}, {row['loss']}{settings}, seed {row['seed']}", ""]
        order = ("loss", "acc", "confusion_train", "confusion_validation", "confusion")
        lines += [" ".join(f"![{k}]({files[k]})" for k in order if k in files), ""]
    return lines
