"""Shared fixtures: one place that shrinks any spec to test size, tiny image folders, real data."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CXR_REAL = (REPO / ".." / "shared" / "cxr-real").resolve()
needs_cxr_real = pytest.mark.skipif(not CXR_REAL.is_dir(), reason=f"real chest X-rays not present at {CXR_REAL}")

# What every test sweep uses instead of the spec's own sizes: tiny images, few epochs, no weights.
SHRINK = {
    "data": {"image_size": 32, "augment": False},
    "trainer": {"epochs": 2, "batch_size": 16, "head_hidden": 16, "weights": "none"},
    "scheduler": {"grace_period": 1},
    "resources": {"cpus": 1, "gpu": 0},
}


def shrink(raw: dict, tmp_path: Path, **sections) -> dict:
    """A copy of a raw spec made test-sized, writing under ``tmp_path``; ``sections`` override more."""
    out = copy.deepcopy(raw)
    for section, values in list(SHRINK.items()) + list(sections.items()):
        out.setdefault(section, {})
        out[section] = {**(out[section] or {}), **values}
    out["output"] = str(tmp_path / "out")
    out.get("ray", {}).pop("storage_path", None)
    return out


@pytest.fixture
def tiny_raw(tmp_path: Path) -> dict:
    """A complete, valid raw spec: synthetic data, tiny CNN, 2 configurations, 2 epochs."""
    return shrink({
        "name": "tiny",
        "data": {"synthetic": {"classes": ["infected", "normal"], "train": 24, "validation": 10, "test": 10,
                               "image_size": 36}},
        "grid": {"backbone": ["tiny_cnn"], "freeze": ["fc_only", "none"], "loss": ["ce"], "seed": [0]},
        "trainer": {"lr": 0.01},
        "scheduler": {"metric": "val_loss"},
    }, tmp_path)


@pytest.fixture(scope="module")
def index(request, tmp_path_factory):
    """A scanned synthetic tree sized by the test module's ``SYNTHETIC`` dict (counts, image_size)."""
    from covid_tune.data.dataset import scan_dataset
    from covid_tune.data.synthetic import make_synthetic

    sizes = request.module.SYNTHETIC
    root = make_synthetic(tmp_path_factory.mktemp(request.module.__name__) / "d", counts=sizes["counts"],
                          image_size=sizes["image_size"])
    return scan_dataset(root)


@pytest.fixture(scope="module")
def decoded(request, index):
    """``index``'s train and validation splits decoded at the module's ``SYNTHETIC["decoded_size"]``."""
    from covid_tune.data.cache import build_decoded_cache

    return build_decoded_cache(index, request.module.SYNTHETIC["decoded_size"], True, splits=("train", "validation"))


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``covid-tune ARGS`` in this process (``covid_tune.cli.main.main``), shaped as ``subprocess.run``'s
    result: for the commands that start no Ray (report, predict, a refused run), a new Python process
    is seconds of imports for nothing."""
    from covid_tune.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["covid-tune", *args], code, captured.out, captured.err)


def load_sweep(name: str) -> dict:
    return yaml.safe_load((REPO / "sweeps" / name).read_text())


def write_image(path: Path, mode: str = "L", size: int = 24, seed: int = 0) -> Path:
    """A small random image in the given PIL mode (L, RGB, RGBA)."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, size=(size, size, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path):
    """Factory: an ImageFolder tree ``root/{train,validation,test}/<class>/`` with n images each."""

    def make(classes=("covid", "normal", "pneumonia"), n: int = 3, splits=("train", "validation", "test"),
             mode: str = "L") -> Path:
        root = tmp_path / "data"
        for s_i, split in enumerate(splits):
            for c_i, cls in enumerate(classes):
                for i in range(n):
                    write_image(root / split / cls / f"{cls}_{i}.png", mode, seed=100 * s_i + 10 * c_i + i)
        return root

    return make


def parse_markdown_table(md: str, heading: str) -> pd.DataFrame:
    """The first GitHub table after ``## heading``, every cell a string."""
    lines = md.split(f"## {heading}\n", 1)[1].strip().splitlines()
    lines = lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])
