"""Every shipped spec in sweeps/ loads and passes `covid-tune run SPEC --dry-run` (writing nothing in the repo).

A spec whose data is not here (part1/part2 expect the course datasets, cxr-real ../shared/cxr-real) is
dry-run on a tiny ImageFolder tree with the spec's classes, made under tmp_path; resources beyond this
machine's are scaled down to it (the pre-flight would rightly refuse them here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from covid_tune.data.synthetic import make_synthetic
from covid_tune.spec.load import load_spec
from covid_tune.spec.plan import expand

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def tiny_tree(spec, tmp_path: Path) -> Path:
    """An ImageFolder tree with the classes the spec expects: covid/normal/pneumonia where it merges or
    implies them (class_map, multi-label), else infected/normal."""
    three = spec.data.label_mode == "multi" or spec.data.class_map
    classes = ["covid", "normal", "pneumonia"] if three else ["infected", "normal"]
    return make_synthetic(tmp_path / "data", classes, {"train": 2, "validation": 2, "test": 2}, image_size=36)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_spec_validates_and_dry_runs(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    overrides = [f"output={tmp_path / 'out'}"]
    root = spec.data.root
    if root is not None and not (REPO / root).is_dir():
        overrides.append(f"data.root={tiny_tree(spec, tmp_path)}")
    if spec.resources.cpus > (os.cpu_count() or 1):
        overrides.append("resources.cpus=1")
    if spec.resources.gpu and not torch.cuda.is_available():
        overrides.append("resources.gpu=0")
    n_trials = len(expand(load_spec(path, overrides)))
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "covid_tune", "run", str(path.relative_to(REPO)), "--dry-run", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"{n_trials} trial(s)" in proc.stdout
    ids = {ln.split("|")[2].strip() for ln in proc.stdout.splitlines() if re.match(r"\|\s*\d+\s*\|", ln)}
    assert ids == set(expand(load_spec(path, overrides)))
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
