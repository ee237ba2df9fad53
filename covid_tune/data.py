"""Datasets: scan and check an ImageFolder tree, encode labels, transforms, synthetic data.

Layout: ``ROOT/{train,validation,test}/<class>/<image>`` (split names case-insensitive).
``scan_dataset`` checks the whole tree before any training starts and raises
:class:`DatasetError` listing every offending path.
"""

from __future__ import annotations

import json
import os
import shutil
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


# --- synthetic data ------------------------------------------------------------------------

def _lung_masks(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    left = ((xx - 0.32) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    right = ((xx - 0.68) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    return yy, xx, left, right


def synthetic_image(rng: np.random.Generator, size: int, pattern: int) -> np.ndarray:
    """One grayscale 'chest' image; pattern 0 is normal, 1.. add class-specific opacities."""
    yy, xx, left, right = _lung_masks(size)
    img = 0.55 + 0.1 * rng.standard_normal() * (yy - 0.5) + 0.04 * rng.standard_normal((size, size))
    img[left | right] -= 0.25 + 0.05 * rng.standard_normal()
    lungs = left | right
    for _ in range(rng.integers(0, 3)):  # ribs-like distractors in every class
        y0 = rng.uniform(0.25, 0.75)
        img[np.abs(yy - y0) < 0.012] += 0.06
    if pattern == 1:  # a few round opacities anywhere in the lungs
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0.3, 0.7), rng.choice([0.32, 0.68]) + rng.uniform(-0.08, 0.08)
            r = rng.uniform(0.05, 0.09)
            img += rng.uniform(0.2, 0.35) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) * lungs
    elif pattern == 2:  # a diffuse opacity low in one lung
        side = left if rng.random() < 0.5 else right
        img += rng.uniform(0.12, 0.2) * side * (yy > rng.uniform(0.45, 0.6))
    elif pattern >= 3:  # streaks across both lungs
        for _ in range(rng.integers(3, 6)):
            y0 = rng.uniform(0.3, 0.7)
            img += 0.15 * (np.abs(yy - y0) < 0.02) * lungs
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic(root: str | Path, classes: Sequence[str] = ("infected", "normal"),
                   counts: dict[str, int] | None = None, image_size: int = 64, seed: int = 0) -> Path:
    """Write a deterministic, learnable ImageFolder dataset to ``root`` (skipped if already there).

    A class named ``normal`` gets no opacities; the first three others get distinct patterns
    (round opacities, a diffuse lower-lung opacity, streaks; further classes repeat the streaks).
    The same arguments always give byte-identical files.
    """
    root = Path(root)
    counts = counts or {"train": 60, "validation": 20, "test": 20}
    params = {"classes": list(classes), "counts": counts, "image_size": image_size, "seed": seed, "version": 1}
    marker = root / ".synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    others = [c for c in classes if c != "normal"]
    for s_idx, split in enumerate(SPLITS):
        for c_idx, cls in enumerate(classes):
            pattern = 0 if cls == "normal" else others.index(cls) + 1
            rng = np.random.default_rng([seed, s_idx, c_idx])
            folder = tmp / split / cls
            folder.mkdir(parents=True)
            for i in range(counts[split]):
                Image.fromarray(synthetic_image(rng, image_size, pattern), "L").save(folder / f"{cls}_{i:04d}.png")
    (tmp / ".synthetic.json").write_text(json.dumps(params))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root
