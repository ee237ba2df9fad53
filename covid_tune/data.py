"""Datasets: scan and check an ImageFolder tree, encode labels, transforms (synthetic data: :mod:`covid_tune.synthetic`).

Layout: ``ROOT/{train,validation,test}/<class>/<image>`` (split names case-insensitive).
``scan_dataset`` checks the whole tree before any training starts and raises
:class:`DatasetError` listing every offending path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from covid_tune.models import IMAGENET_MEAN, IMAGENET_STD

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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

    def paths(self, split: str) -> list[str]:
        return [p for p, _ in self.splits[split]]

    def labels(self, split: str) -> np.ndarray:
        return np.array([y for _, y in self.splits[split]], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: int((self.labels(s) == i).sum()) for i, c in enumerate(self.classes)}
                for s in self.splits}


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


def _check_image(path: Path) -> str | None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{path}: not an image file (extension {path.suffix or 'none'!r}; allowed: {', '.join(IMAGE_EXTENSIONS)})"
    try:
        with Image.open(path) as im:
            im.verify()  # PNG chunk checksums
        with Image.open(path) as im:
            im.load()  # a full decode: verify() does not read JPEG data, so truncation shows only here
    except Exception as exc:  # PIL raises many types for broken files
        return f"{path}: unreadable image ({type(exc).__name__}: {exc})"
    return None


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
                problem = f"{f}: not a file" if not f.is_file() else (_check_image(f) if verify else None)
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
    return DatasetIndex(root=root, classes=classes, splits=splits, original_classes=all_classes,
                        skipped=[b.split(": ", 1)[0] for b in bad])


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


# --- transforms ----------------------------------------------------------------------------

def train_transform(image_size: int, augment: bool = True) -> T.Compose:
    """The course's training preset: rotation, random resized crop, flip, ImageNet normalization."""
    if not augment:
        return eval_transform(image_size)
    return T.Compose([
        T.RandomRotation(30),
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
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
    """Open any grayscale/RGB/RGBA/palette image as one-channel ``L`` (grayscale) or ``RGB``.

    Transparency is composited onto black. :func:`load_image` is this plus channel replication;
    the decoded cache (:mod:`covid_tune.cache`) keeps grayscale as one channel until the model.
    """
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
