"""Datasets: scan and check an ImageFolder tree, encode labels, transforms
(synthetic data: :mod:`covid_tune.data.synthetic`).

Layout: ``ROOT/{train,validation,test}/<class>/<image>`` (split names case-insensitive).
``scan_dataset`` checks the whole tree before any training starts and raises
:class:`DatasetError` listing every offending path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from covid_tune.data.augment import augment_settings
from covid_tune.data.dicom import DICOM_EXTENSIONS, DicomUnavailable, decode_dicom, is_dicom
from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
# DICOM also without an extension, when the file carries the DICOM preamble (covid_tune.data.dicom.is_dicom)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm") + DICOM_EXTENSIONS


class DatasetError(ValueError):
    """The data folder cannot be used as it is; the message lists every problem found."""

    def __init__(self, root: Path, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"dataset {root} has {len(self.problems)} problem(s):\n{listing}{more}")


@dataclass
class DatasetIndex:
    """Every usable image of every split, with labels after ``class_map``."""

    root: Path
    classes: list[str]  # after class_map, sorted; label i means classes[i]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(path, label index)]
    original_classes: list[str]
    skipped: list[str] = field(default_factory=list)
    duplicates: Duplicates | None = None  # set by the sweep's driver once the decoded pixels are compared
    # a multi-label table's (covid_tune.data.table) rows: split -> (N, classes) 0/1; labels() then gives
    # each image's first label, for per-class samples
    hot: dict[str, np.ndarray] | None = None
    patients: dict[str, list[str]] | None = None  # a label table's patient of each image, per split
    # data.folds: the fold of each pooled image (train rows, then validation rows); covid_tune.data.folds
    folds: np.ndarray | None = None

    def paths(self, split: str) -> list[str]:
        return [p for p, _ in self.splits[split]]

    def labels(self, split: str) -> np.ndarray:
        return np.array([y for _, y in self.splits[split]], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class and split (for multi-label tables: images with that label)."""
        if self.hot is not None:
            return {s: {c: int(self.hot[s][:, i].sum()) for i, c in enumerate(self.classes)} for s in self.splits}
        return {s: {c: int((self.labels(s) == i).sum()) for i, c in enumerate(self.classes)}
                for s in self.splits}

    def present(self, split: str) -> list[str]:
        """The classes with at least one image in ``split``."""
        if self.hot is not None:
            return [c for i, c in enumerate(self.classes) if self.hot[split][:, i].any()]
        return sorted({self.classes[y] for _, y in self.splits[split]})

    def keep(self, keep: dict[str, list[bool]]) -> DatasetIndex:
        """This index with only the rows ``keep[split]`` marks (every row of a split not named)."""
        def sel(split: str, items: list) -> list:
            return [x for x, k in zip(items, keep[split]) if k] if split in keep else list(items)

        return DatasetIndex(self.root, self.classes, {s: sel(s, v) for s, v in self.splits.items()},
                            self.original_classes, self.skipped, self.duplicates,
                            {s: v[np.asarray(keep[s], bool)] if s in keep else v for s, v in self.hot.items()}
                            if self.hot is not None else None,
                            {s: sel(s, v) for s, v in self.patients.items()} if self.patients is not None else None)


def _find_splits(root: Path) -> tuple[dict[str, Path], list[str]]:
    found: dict[str, Path] = {}
    problems = []
    for child in sorted(root.iterdir()):
        split = _SPLIT_ALIASES.get(child.name.lower())
        if split is None or not child.is_dir():
            continue
        if split in found:
            problems.append(f"{child}: split {split!r} given twice (also {found[split]})")
        found[split] = child
    for split in SPLITS:
        if split not in found:
            problems.append(f"{root}: missing split folder {split!r} (expected {root}/{split}/<class>/...)")
    return found, problems


def is_image_file(path: Path) -> bool:
    """An image by its extension, or a DICOM file without one."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)


def _check_image(path: Path) -> str | None:
    if not is_image_file(path):
        return (f"{path}: not an image file (extension {path.suffix or 'none'!r}; "
                f"allowed: {', '.join(IMAGE_EXTENSIONS)})")
    if is_dicom(path):
        try:
            with warnings.catch_warnings():  # pydicom warns about each oddity of a broken file; the problem says it
                warnings.simplefilter("ignore")
                decode_dicom(path)  # the whole decode: a missing pixel-data handler shows only here
        except DicomUnavailable:
            raise
        except Exception as exc:  # pydicom raises many types for broken or undecodable files
            hint = (" (a compressed transfer syntax: pip install 'covid_tune[dicom-compressed]')"
                    if "pylibjpeg" in str(exc) or "handler" in str(exc).lower() else "")
            return f"{path}: unreadable DICOM ({type(exc).__name__}: {_first_line(exc)}){hint}"
        return None
    try:
        with Image.open(path) as im:
            im.verify()  # PNG chunk checksums
        with Image.open(path) as im:
            im.load()  # a full decode: verify() does not read JPEG data, so truncation shows only here
    except Exception as exc:  # PIL raises many types for broken files
        return f"{path}: unreadable image ({type(exc).__name__}: {exc})"
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def scan_dataset(root: str | Path, class_map: dict[str, str] | None = None, on_bad_file: str = "error",
                 verify: bool = True) -> DatasetIndex:
    """Index and check an ImageFolder dataset.

    Problems found: missing or duplicated splits, class folders that differ between splits, empty
    classes, non-image or unreadable files (skipped with a warning when ``on_bad_file='skip'``),
    ``class_map`` keys naming no class. Hidden files (``.name``) are ignored.
    """
    root = Path(root)
    class_map = dict(class_map or {})
    if not root.is_dir():
        raise DatasetError(root, [f"{root}: data folder does not exist"])
    split_dirs, problems = _find_splits(root)
    if problems:
        raise DatasetError(root, problems)

    per_split = {s: sorted(d.name for d in split_dirs[s].iterdir() if d.is_dir() and not d.name.startswith("."))
                 for s in SPLITS}
    all_classes = sorted(set().union(*per_split.values()))
    for split, names in per_split.items():
        missing = [c for c in all_classes if c not in names]
        if missing:
            problems.append(f"{split_dirs[split]}: missing class folder(s) {missing} "
                            f"(classes seen in other splits: {all_classes})")
    unknown = sorted(set(class_map) - set(all_classes))
    if unknown:
        problems.append(f"data.class_map names class(es) {unknown} that are not in the data (classes: {all_classes})")
    if problems:
        raise DatasetError(root, problems)

    classes = sorted({class_map.get(c, c) for c in all_classes})
    splits: dict[str, list[tuple[str, int]]] = {}
    bad: list[str] = []
    for split in SPLITS:
        items = []
        for cls in per_split[split]:
            folder = split_dirs[split] / cls
            files = sorted(f for f in folder.iterdir() if not f.name.startswith("."))
            good = []
            for f in files:
                try:
                    problem = f"{f}: not a file" if not f.is_file() else (_check_image(f) if verify else None)
                except DicomUnavailable as exc:  # one message for the whole tree, not one per file
                    raise DatasetError(root, [f"{f}: {exc}"]) from None
                if problem:
                    bad.append(problem)
                else:
                    good.append(str(f))
            if not good:
                problems.append(f"{folder}: class {cls!r} has no usable images in split {split!r}")
            items += [(p, classes.index(class_map.get(cls, cls))) for p in good]
        splits[split] = items
    if bad and on_bad_file != "skip":
        problems = bad + problems + ["(set data.on_bad_file: skip to leave bad files out with a warning)"]
    elif bad:
        warnings.warn(f"skipping {len(bad)} bad file(s) in {root}:\n" + "\n".join(bad[:20]), stacklevel=2)
    if problems:
        raise DatasetError(root, problems)
    index = DatasetIndex(root=root, classes=classes, splits=splits, original_classes=all_classes,
                         skipped=[b.split(": ", 1)[0] for b in bad])
    problems = class_problems(index, class_map)
    if problems:
        raise DatasetError(root, problems)
    return index


def class_problems(index: DatasetIndex, class_map: dict[str, str] | None = None) -> list[str]:
    """Splits that a classifier cannot use: fewer than two classes with images, or a class with none."""
    problems = []
    for split in index.splits:
        present = index.present(split)
        if len(present) < 2:
            how = (f" (folders {index.original_classes} merged by data.class_map)"
                   if class_map and len(index.original_classes) > len(index.classes) else "")
            problems.append(f"split {split!r} has images of {len(present)} class(es) {present}{how}; "
                            "a classifier needs at least two classes with images in every split")
        else:
            empty = [c for c in index.classes if c not in present]
            if empty:
                problems.append(f"split {split!r} has no images of class(es) {empty} (classes with images: {present})")
    return problems


# (later split, earlier split): an image of the later one whose pixels equal one of the earlier leaks into it
DUPLICATE_PAIRS = (("validation", "train"), ("test", "train"), ("test", "validation"))
DUPLICATE_ACTIONS = ("warn", "error", "drop")


@dataclass
class Duplicates:
    """Images of a later split whose decoded pixels equal an image of an earlier split (``data.on_duplicate``).

    ``pairs[(later, earlier)]`` lists ``(later path, earlier path)``, relative to ``root``; ``action`` is what
    the sweep did with them: warn (kept), error (refused) or drop (removed from the later split)."""

    root: Path
    pairs: dict[tuple[str, str], list[tuple[str, str]]]
    action: str = "warn"
    how: str = ""  # what was compared, for the record

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.pairs.values())

    def count(self, later: str, earlier: str) -> int:
        return len(self.pairs.get((later, earlier), []))

    def summary(self) -> str:
        """``3 test images also in train, 1 validation image also in train`` (or that there are none)."""
        parts = [f"{n} {later} image{'s' if n != 1 else ''} also in {earlier}"
                 for (later, earlier) in DUPLICATE_PAIRS if (n := self.count(later, earlier))]
        return ", ".join(parts) if parts else "no image of validation or test is also in an earlier split"

    def examples(self, per_pair: int = 3) -> list[str]:
        """A few ``later = earlier`` path pairs of each kind."""
        lines = []
        for key in DUPLICATE_PAIRS:
            found = self.pairs.get(key, [])
            lines += [f"{a} = {b}" for a, b in found[:per_pair]]
            if len(found) > per_pair:
                lines.append(f"... and {len(found) - per_pair} more {key[0]} image(s) also in {key[1]}")
        return lines

    def later_paths(self) -> dict[str, set[str]]:
        """Relative paths per later split that have a copy in an earlier split (what ``drop`` removes)."""
        out: dict[str, set[str]] = {}
        for (later, _), found in self.pairs.items():
            out.setdefault(later, set()).update(a for a, _ in found)
        return out

    def to_dict(self) -> dict:
        return {"root": str(self.root), "action": self.action, "compared": self.how, "summary": self.summary(),
                "pairs": [{"split": later, "also_in": earlier, "images": [list(p) for p in found]}
                          for (later, earlier), found in self.pairs.items() if found]}

    @classmethod
    def from_dict(cls, d: dict) -> Duplicates:
        return cls(Path(d["root"]), {(g["split"], g["also_in"]): [tuple(p) for p in g["images"]] for g in d["pairs"]},
                   d.get("action", "warn"), d.get("compared", ""))


def match_duplicates(index: DatasetIndex, digests: dict[str, Sequence[str]], how: str = "") -> Duplicates:
    """Pair up images of later splits with an earlier split's image of the same pixel digest (one per split,
    in index order); the first earlier image with that digest is named."""
    rel = _relative_to(index.root)
    pairs = {}
    for later, earlier in DUPLICATE_PAIRS:
        seen: dict[str, str] = {}
        for p, d in zip(index.paths(earlier), digests[earlier]):
            seen.setdefault(d, p)
        found = [(rel(p), rel(seen[d])) for p, d in zip(index.paths(later), digests[later]) if d in seen]
        if found:
            pairs[(later, earlier)] = found
    return Duplicates(index.root, pairs, how=how)


def _relative_to(root: Path):
    def rel(p: str) -> str:
        return Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else p
    return rel


def drop_duplicates(index: DatasetIndex, dups: Duplicates) -> DatasetIndex:
    """``index`` without the later-split copies in ``dups``; a split left unusable is a DatasetError."""
    drop, rel = dups.later_paths(), _relative_to(index.root)
    out = index.keep({s: [rel(p) not in drop.get(s, set()) for p in index.paths(s)] for s in index.splits})
    out.duplicates = dups
    problems = class_problems(out)
    if problems:
        raise DatasetError(index.root, [f"after data.on_duplicate: drop removed {dups.summary()}: {p}"
                                        for p in problems])
    return out


def check_implies(classes: Sequence[str], implies: dict[str, list[str]]) -> None:
    """Every class named in ``implies`` must exist after ``class_map``."""
    named = set(implies) | {c for targets in implies.values() for c in targets}
    unknown = sorted(named - set(classes))
    if unknown:
        raise ValueError(f"data.implies names class(es) {unknown}; allowed: {sorted(classes)}")


def encode_targets(labels: np.ndarray, classes: Sequence[str], label_mode: str,
                   implies: dict[str, list[str]] | None = None) -> np.ndarray:
    """Class indices (single) or multi-hot float rows with ``implies`` applied (multi)."""
    labels = np.asarray(labels, dtype=np.int64)
    if label_mode == "single":
        return labels
    hot = np.zeros((len(labels), len(classes)), dtype=np.float32)
    hot[np.arange(len(labels)), labels] = 1.0
    for src, targets in (implies or {}).items():
        rows = labels == classes.index(src)
        for t in targets:
            hot[rows, classes.index(t)] = 1.0
    return hot


def index_targets(index: DatasetIndex, split: str, label_mode: str,
                  implies: dict[str, list[str]] | None = None) -> np.ndarray:
    """The targets of ``split``: :func:`encode_targets` of its labels, or a multi-label table's rows with
    ``implies`` applied."""
    if index.hot is None:
        return encode_targets(index.labels(split), index.classes, label_mode, implies)
    if label_mode != "multi":
        raise ValueError("a multi-label table needs label_mode 'multi'")
    hot = index.hot[split].astype(np.float32, copy=True)
    for src, targets in (implies or {}).items():
        rows = hot[:, index.classes.index(src)] > 0
        for t in targets:
            hot[rows, index.classes.index(t)] = 1.0
    return hot


# --- transforms ----------------------------------------------------------------------------

def train_transform(image_size: int, augment: bool | str | dict = True) -> T.Compose:
    """The training transform: rotation, random resized crop, flip (as ``augment`` sets them,
    :func:`covid_tune.data.augment.augment_settings`; the course's preset by default), ImageNet normalization."""
    settings = augment_settings(augment)
    if settings is None:
        return eval_transform(image_size)
    return T.Compose([
        T.RandomRotation(settings.degrees),
        T.RandomResizedCrop(image_size, scale=settings.scale, ratio=settings.ratio),
        *([T.RandomHorizontalFlip()] if settings.flip else []),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Resize to 256/224 of the crop size, then center-crop (the course's Resize(256)+CenterCrop(224))."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def decode_image(path: str, grayscale: bool = True) -> Image.Image:
    """Open any grayscale/RGB/RGBA/palette image or DICOM file as one-channel ``L`` (grayscale) or ``RGB``.

    Transparency is composited onto black. :func:`load_image` is this plus channel replication;
    the decoded cache (:mod:`covid_tune.data.cache`) keeps grayscale as one channel until the model.
    """
    if is_dicom(path):  # windowed, inverted if MONOCHROME1, 8-bit (covid_tune.data.dicom)
        arr = decode_dicom(path)
        im = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
        return im.convert("L") if grayscale else im.convert("RGB")
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float X-rays: stretch the image's own range to 0-255 (convert("L") would clip)
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            im = Image.fromarray(np.round(arr).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("L") if grayscale else im.convert("RGB")


def load_image(path: str, grayscale: bool = True) -> Image.Image:
    """Open any grayscale/RGB/RGBA/palette image as 3-channel RGB (grayscale replicated)."""
    return decode_image(path, grayscale).convert("RGB")


class ImageDataset(Dataset):
    """Images from disk with precomputed targets."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, transform, grayscale: bool = True) -> None:
        self.paths = list(paths)
        self.targets = torch.as_tensor(targets)
        self.transform = transform
        self.grayscale = grayscale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(load_image(self.paths[i], self.grayscale)), self.targets[i]
