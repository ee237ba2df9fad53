"""A generated, learnable chest-X-ray-like ImageFolder dataset (the demo's and the tests' data)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from covid_tune.data.dataset import SPLITS


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
