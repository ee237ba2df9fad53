"""The documentation: every example in docs/examples runs, README.md stays a short guide, no link is dead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLES = sorted((REPO / "docs" / "examples").glob("*.py"))
# what each example must print (beside exiting 0)
EXPECTED = {"train_one.py": [r"epoch 1: train loss \d", r"val loss \d", r"test: loss \d\.\d+ acc \d\.\d+"]}
# [text](target): a relative target is checked; URLs and in-page anchors are not
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for pattern in EXPECTED.get(example.name, []):
        assert re.search(pattern, proc.stdout), (pattern, proc.stdout)
    assert list(tmp_path.iterdir()) == []  # the default output folder is a temporary one, removed


def test_readme_is_a_short_guide() -> None:
    readme = (REPO / "README.md").read_bytes()
    assert len(readme) < 12 * 1024, f"README.md is {len(readme)} bytes: move detail into docs/"
    text = readme.decode()
    # .ci/run runs exactly these lines: keep them byte-identical
    for line in ("pip install -e '.[test]'", "pytest", "covid-tune run sweeps/demo.yaml",
                 "covid-tune predict runs/demo runs/demo/synthetic-data/test"):
        assert line in text


@pytest.mark.parametrize("doc", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files(doc: Path) -> None:
    dead = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            dead.append(target)
    assert not dead, f"{doc.name}: links to missing files: {dead}"
