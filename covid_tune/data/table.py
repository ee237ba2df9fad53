"""Label tables: a folder of images plus a CSV naming each image's label(s), patient and (optionally) split.

The layout of NIH ChestX-ray14, CheXpert, MIMIC-CXR and RSNA. :class:`LabelTable` says which columns
hold what; :func:`scan_table` reads the CSV, checks every row (a file that is not there, a label value
outside the allowed ones: one message per row, all rows at once, as :class:`DatasetError`) and returns the
same :class:`~covid_tune.data.dataset.DatasetIndex` an ImageFolder tree gives, multi-hot rows included
for multi-label tables.

Without a split column, images are split by patient (:func:`split_by_patient`: seeded, stratified by
label, every image of one patient in one split); :func:`write_splits` writes the result, so a run can be
repeated or its split reused (as a CSV with a split column).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_tune.data.dataset import (
    _SPLIT_ALIASES,
    SPLITS,
    DatasetError,
    DatasetIndex,
    _check_image,
    class_problems,
)

# the values a 0/1 label column may hold (CheXpert's -1 "uncertain" and blanks are refused: map them first)
_TRUE, _FALSE = ("1", "1.0", "true", "yes"), ("0", "0.0", "false", "no")


@dataclass(frozen=True)
class LabelTable:
    """Where a label table is and how to read it (``data.labels`` + ``data.columns`` of a spec)."""

    csv: Path
    root: Path  # image paths in the CSV are relative to it
    path: str  # column with the image path
    label: str | None = None  # one label column (single-label, or several values joined by ``separator``)
    labels: tuple[str, ...] = ()  # 0/1 columns, one per class (multi-label)
    separator: str | None = None  # with ``label``: ``Effusion|Infiltration`` style multi-label cells
    patient: str | None = None  # column with the patient id (the group kept within one split)
    split: str | None = None  # column with train/validation/test (else split by patient here)
    classes: tuple[str, ...] = ()  # the allowed label values of ``label`` (default: every value found)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, validation, test
    seed: int = 0

    @property
    def multi(self) -> bool:
        return bool(self.labels) or self.separator is not None


@dataclass
class _Row:
    line: int
    path: str
    values: list[str]
    patient: str
    split: str | None = None
    problems: list[str] = field(default_factory=list)


def _read_rows(table: LabelTable) -> tuple[list[dict[str, str]], list[str]]:
    try:
        with open(table.csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(table.csv, [f"{table.csv}: cannot read the label table ({exc})"]) from None
    needed = [c for c in (table.path, table.label, table.patient, table.split, *table.labels) if c]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DatasetError(table.csv, [f"{table.csv}: no column(s) {missing} named in data.columns "
                                       f"(its columns: {header})"])
    if not rows:
        raise DatasetError(table.csv, [f"{table.csv}: no rows"])
    return rows, header


def _label_values(table: LabelTable, record: dict[str, str], where: str) -> tuple[list[str], list[str]]:
    """The class names of one row, and its problems."""
    if table.labels:
        values, problems = [], []
        for col in table.labels:
            cell = (record.get(col) or "").strip().lower()
            if cell in _TRUE:
                values.append(col)
            elif cell not in _FALSE:
                problems.append(f"{where}: column {col!r} has {record.get(col)!r}; allowed: 0 or 1 "
                                "(map uncertain or blank values to 0 or 1 first)")
        return values, problems
    cell = (record.get(table.label) or "").strip()
    values = [v.strip() for v in cell.split(table.separator)] if table.separator is not None else [cell]
    values = [v for v in values if v] if table.separator is not None else values
    if not table.separator and not cell:
        return [], [f"{where}: column {table.label!r} is empty"]
    unknown = [v for v in values if table.classes and v not in table.classes]
    if unknown:
        return [], [f"{where}: column {table.label!r} has {', '.join(map(repr, unknown))}; "
                    f"allowed: {', '.join(table.classes)}"]
    return values, []


def split_by_patient(patients: Sequence[str], strata: Sequence[str], fractions: Sequence[float],
                     seed: int) -> dict[str, str]:
    """patient -> split: within each stratum the patients are shuffled (seeded) and cut at the cumulative
    fractions, so every split gets its share of each stratum and no patient is in two splits."""
    by_stratum: dict[str, list[str]] = {}
    for patient, stratum in sorted(dict(zip(patients, strata)).items()):
        by_stratum.setdefault(stratum, []).append(patient)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    bounds = np.cumsum(fractions)
    for stratum in sorted(by_stratum):
        group = by_stratum[stratum]
        order = rng.permutation(len(group))
        cuts = [int(math.floor(b * len(group) + 0.5)) for b in bounds[:-1]]
        for rank, i in enumerate(order):
            out[group[i]] = SPLITS[sum(rank >= c for c in cuts)]
    return out


def scan_table(table: LabelTable, class_map: dict[str, str] | None = None, on_bad_file: str = "error",
               verify: bool = True) -> DatasetIndex:
    """Read and check a label table into a :class:`DatasetIndex` (``hot`` set for a multi-label table).

    Refused (every row's problem listed): a row naming a file that is not there, a label value that is not
    allowed, a split value other than train/validation/test, class_map keys naming no label, a patient in
    two splits of the split column. Unreadable images are bad files under ``on_bad_file`` like a tree's.
    """
    class_map = dict(class_map or {})
    records, _ = _read_rows(table)
    rows: list[_Row] = []
    problems: list[str] = []
    for line, record in enumerate(records, start=2):  # line 1 is the header
        where = f"{table.csv.name} line {line}"
        rel = (record.get(table.path) or "").strip()
        values, row_problems = _label_values(table, record, where)
        row = _Row(line, str(table.root / rel), values, (record.get(table.patient) or "").strip()
                   if table.patient else f"row{line}", problems=row_problems)
        if not rel:
            row.problems.append(f"{where}: column {table.path!r} is empty")
        elif not Path(row.path).is_file():
            row.problems.append(f"{where}: file {rel} does not exist (looked for {row.path})")
        if table.patient and not row.patient:
            row.problems.append(f"{where}: column {table.patient!r} (patient) is empty")
        if table.split:
            cell = (record.get(table.split) or "").strip()
            row.split = _SPLIT_ALIASES.get(cell.lower())
            if row.split is None:
                row.problems.append(f"{where}: column {table.split!r} has {cell!r}; allowed: train, validation "
                                    "(or val), test")
        problems += row.problems
        rows.append(row)
    if problems:
        raise DatasetError(table.csv, problems)

    found = sorted({v for r in rows for v in r.values} | set(table.labels) | set(table.classes))
    unknown = sorted(set(class_map) - set(found))
    if unknown:
        raise DatasetError(table.csv, [f"data.class_map names label(s) {unknown} that are not in the table "
                                       f"(labels: {found})"])
    classes = sorted({class_map.get(c, c) for c in found})
    for r in rows:
        r.values = sorted({class_map.get(v, v) for v in r.values})

    bad = [p for r in rows if verify and (p := _check_image(Path(r.path)))]
    if bad and on_bad_file != "skip":
        raise DatasetError(table.csv, bad + ["(set data.on_bad_file: skip to leave bad files out with a warning)"])
    if bad:
        warnings.warn(f"skipping {len(bad)} bad file(s) in {table.csv}:\n" + "\n".join(bad[:20]), stacklevel=2)
        skipped = {b.split(": ", 1)[0] for b in bad}
        rows = [r for r in rows if r.path not in skipped]

    if table.split:
        seen: dict[str, set[str]] = {}
        for r in rows:
            seen.setdefault(r.patient, set()).add(r.split)
        leaks = sorted(p for p, s in seen.items() if len(s) > 1)
        if table.patient and leaks:
            raise DatasetError(table.csv, [f"patient {p!r} has images in splits {sorted(seen[p])} (column "
                                           f"{table.split!r}); one patient's images belong in one split"
                                           for p in leaks[:20]])
    else:
        strata = {}
        for r in rows:  # a patient's stratum: the label set of its first image ("" for none)
            strata.setdefault(r.patient, "|".join(r.values))
        assign = split_by_patient(list(strata), list(strata.values()), table.fractions, table.seed)
        for r in rows:
            r.split = assign[r.patient]

    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    hot: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    patients: dict[str, list[str]] = {s: [] for s in SPLITS}
    for r in rows:
        vec = np.zeros(len(classes), np.float32)
        vec[[classes.index(v) for v in r.values]] = 1.0
        # the representative class of a row (per-class samples, counts of single-label data): its first label
        first = classes.index(r.values[0]) if r.values else 0
        splits[r.split].append((r.path, first))
        hot[r.split].append(vec)
        patients[r.split].append(r.patient)
    index = DatasetIndex(root=table.root, classes=classes, splits=splits, original_classes=found,
                         skipped=[b.split(": ", 1)[0] for b in bad],
                         hot={s: np.stack(v) if v else np.zeros((0, len(classes)), np.float32)
                              for s, v in hot.items()} if table.multi else None,
                         patients=patients)
    problems = class_problems(index, class_map)
    if problems:
        raise DatasetError(table.csv, problems)
    return index


def write_splits(index: DatasetIndex, path: Path) -> Path:
    """``path`` (a CSV: path relative to the data root, patient, split), the split this run used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "split"])
        for split in SPLITS:
            pats = (index.patients or {}).get(split) or [""] * len(index.splits[split])
            for (p, _), patient in zip(index.splits[split], pats):
                rel = Path(p).relative_to(index.root).as_posix() if Path(p).is_relative_to(index.root) else p
                w.writerow([rel, patient, split])
    tmp.replace(path)
    return path
