"""Grouped cross-validation folds: train and validation pooled and cut into K folds by group.

A group is what must never be split (a patient): a column of ``ROOT/manifest.csv``, the match of a
regular expression on the file name (``re:PATTERN``: the first capturing group, else the whole match),
or ``none`` (each image its own group). Folds come from scikit-learn's ``StratifiedGroupKFold``
(shuffled, seeded), so each fold's class mix is close to the whole's and no group is in two folds.
The test split is never in a fold; a group found both in test and in train/validation is refused
(:class:`FoldError`), since the folds would then estimate nothing about new patients.

:func:`with_folds` returns the index with ``folds`` set (one fold number per pooled image: the train
rows, then the validation rows); :func:`fold_view` is fold k's index and decoded cache (train = the
other folds, validation = fold k) built from the pooled arrays, without decoding anything again.
No Ray: the sweep's trainable, the test evaluation and ``benchmarks/selection.py`` share it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from covid_tune.data.dataset import DatasetIndex

MANIFEST = "manifest.csv"
POOLED = ("train", "validation")


class FoldError(ValueError):
    """The folds cannot be made as asked (one message: the key, what is wrong, what is allowed)."""


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def image_groups(index: DatasetIndex, group_by: str, splits: Sequence[str] = ("train", "validation", "test")
                 ) -> dict[str, list[str]]:
    """Each image's group, per split: ``group_by`` is a manifest column, ``re:PATTERN`` or ``none``."""
    if group_by == "none":
        return {s: [_relative(p, index.root) for p in index.paths(s)] for s in splits}
    if group_by.startswith("re:"):
        pattern = re.compile(group_by[3:])
        out, unmatched = {}, []
        for s in splits:
            names = [Path(p).name for p in index.paths(s)]
            found = [pattern.search(n) for n in names]
            unmatched += [n for n, m in zip(names, found) if m is None]
            out[s] = [(m.group(1) if m.re.groups else m.group(0)) if m else "" for m in found]
        if unmatched:
            raise FoldError(f"data.group_by {group_by!r} matches no group in {len(unmatched)} file name(s), e.g. "
                            f"{', '.join(unmatched[:3])} (every file name must match)")
        return out
    import pandas as pd

    manifest = index.root / MANIFEST
    if not manifest.is_file():
        raise FoldError(f"data.group_by {group_by!r}: no {manifest} to read the column from (allowed: a column of "
                        "ROOT/manifest.csv, re:PATTERN on the file name, or none)")
    table = pd.read_csv(manifest, dtype=str)
    if "file" not in table.columns or group_by not in table.columns:
        missing = "file" if "file" not in table.columns else group_by
        raise FoldError(f"data.group_by {group_by!r}: {manifest} has no column {missing!r} (columns: "
                        f"{', '.join(table.columns)})")
    lookup = dict(zip(table["file"], table[group_by]))
    out, missing = {}, []
    for s in splits:
        rel = [_relative(p, index.root) for p in index.paths(s)]
        missing += [r for r in rel if r not in lookup or pd.isna(lookup[r])]
        out[s] = [str(lookup.get(r)) for r in rel]
    if missing:
        raise FoldError(f"data.group_by {group_by!r}: {len(missing)} image(s) without a group in {manifest}, e.g. "
                        f"{', '.join(missing[:3])}")
    return out


def crossing_groups(groups: dict[str, list[str]]) -> list[str]:
    """The groups found both in test and in train/validation (sorted)."""
    pooled = set(groups.get("train", [])) | set(groups.get("validation", []))
    return sorted(pooled & set(groups.get("test", [])))


def assign_folds(labels: Sequence[int], groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """One fold number (0..k-1) per item: StratifiedGroupKFold(k, shuffle=True, random_state=seed)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise FoldError(f"data.folds {k}: only {n_groups} group(s) in train + validation (need at least one per fold)")
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():  # "least populated class has only n members": the folds are still grouped
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held] = fold
    return folds


def with_folds(index: DatasetIndex, k: int, group_by: str, seed: int = 0) -> DatasetIndex:
    """``index`` with ``folds`` set (same object); raises :class:`FoldError` on a group crossing into test."""
    groups = image_groups(index, group_by)
    crossing = crossing_groups(groups)
    if crossing:
        raise FoldError(f"data.group_by {group_by!r}: {len(crossing)} group(s) in both test and train/validation, "
                        f"e.g. {', '.join(crossing[:5])} (a patient must stay on one side of the test split; "
                        "move their images or choose another data.group_by)")
    pooled_groups = groups["train"] + groups["validation"]
    labels = np.concatenate([index.labels(s) for s in POOLED])
    index.folds = assign_folds(labels, pooled_groups, k, seed)
    return index


def fold_view(index: DatasetIndex, decoded, fold: int):
    """Fold ``fold``'s ``(index, decoded)``: train = the pooled images of the other folds, validation = this
    fold's, test (and any other split) unchanged. ``decoded`` (a DecodedSplits or None) is cut from the
    pooled arrays in memory (one copy of the pooled images, no decode)."""
    if index.folds is None:
        raise ValueError(f"fold {fold}: the index has no folds (covid_tune.data.folds.with_folds)")
    held = index.folds == fold
    if not held.any():
        raise ValueError(f"fold {fold}: no image in it (folds 0..{int(index.folds.max())})")
    parts = {"train": ~held, "validation": held}

    def cut(values_by_split: dict) -> dict:
        pooled = [x for s in POOLED for x in values_by_split[s]]
        return {**values_by_split, **{s: [x for x, m in zip(pooled, mask) if m] for s, mask in parts.items()}}

    hot = None
    if index.hot is not None:
        both = np.concatenate([index.hot[s] for s in POOLED])
        hot = {**index.hot, **{s: both[mask] for s, mask in parts.items()}}
    view = DatasetIndex(index.root, index.classes, cut(index.splits), index.original_classes, index.skipped,
                        index.duplicates, hot, cut(index.patients) if index.patients is not None else None)
    if decoded is None:
        return view, None
    from covid_tune.data.cache import DecodedSplits

    arrays = dict(decoded.arrays)
    n_train = len(index.splits["train"])
    for s, mask in parts.items():
        # the rows of each source split that this part takes, gathered without joining the pooled arrays first
        arrays[s] = np.concatenate([np.asarray(decoded["train"])[mask[:n_train]],
                                    np.asarray(decoded["validation"])[mask[n_train:]]])
    keys = {**decoded.keys, **{s: f"{decoded.keys.get('train')}+{decoded.keys.get('validation')}-fold{fold}-{s}"
                               for s in parts}}
    files = {s: f for s, f in decoded.files.items() if s not in parts}
    return view, DecodedSplits(arrays, decoded.image_size, decoded.grayscale, keys, files)


def fold_table(index: DatasetIndex, group_by: str) -> list[str]:
    """One line per fold: images, groups and images per class (for the pre-flight and the run's log)."""
    groups = image_groups(index, group_by, POOLED)
    pooled_groups = np.asarray(groups["train"] + groups["validation"])
    labels = np.concatenate([index.labels(s) for s in POOLED])
    lines = []
    for fold in range(int(index.folds.max()) + 1):
        held = index.folds == fold
        counts = ", ".join(f"{c} {int((labels[held] == i).sum())}" for i, c in enumerate(index.classes))
        lines.append(f"  fold {fold}: {int(held.sum())} images, {len(set(pooled_groups[held].tolist()))} groups "
                     f"({counts})")
    return lines
