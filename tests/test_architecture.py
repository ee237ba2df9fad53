"""The module boundaries README's "How it is built" describes, enforced on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "covid_tune"
# the trials stage: the only modules that may name Ray
RAY_MODULES = {"tuning", "trainable", "resume", "cluster", "evaluation"}
# what the training engine (and what it builds on) may import from the package: nothing downstream of it
ENGINE_SIDE = {"engine", "hparams", "models", "backbones", "freeze", "features", "data", "cache", "augment", "loaders",
               "losses", "metrics", "checkpoints", "explain", "schedule", "synthetic"}
DOWNSTREAM = {"spec", "spec_sections", "plan", "tuning", "trainable", "resume", "cluster", "evaluation", "results",
              "report", "report_sections", "run", "output_dir", "figures"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "covid_tune":
                names.update(f"covid_tune.{a.name}" for a in node.names)
    return names


MODULES = {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_was_read() -> None:
    assert {"engine", "tuning", "run", "spec"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_ray_modules_import_ray(module: str) -> None:
    ray = sorted(n for n in MODULES[module] if n == "ray" or n.startswith("ray."))
    if module in RAY_MODULES:
        return
    assert not ray, f"covid_tune/{module}.py imports {ray}; only {sorted(RAY_MODULES)} may"


@pytest.mark.parametrize("module", sorted(ENGINE_SIDE & set(MODULES)))
def test_the_engine_side_imports_nothing_downstream(module: str) -> None:
    bad = sorted(n for n in MODULES[module] if n.startswith("covid_tune.") and n.split(".")[1] in DOWNSTREAM)
    assert not bad, f"covid_tune/{module}.py imports {bad}: data flows spec -> plan -> trials -> results -> report"


def _loaded(module: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys, covid_tune.{module}; print(*sorted(m for m in {watched!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_importing_the_engine_loads_neither_ray_nor_yaml() -> None:
    out = _loaded("engine", ("ray", "yaml", "pydantic"))
    assert out == [], f"import covid_tune.engine.training loaded {out}"


@pytest.mark.parametrize("module", ["results", "report"])
def test_reading_results_loads_no_ray(module: str) -> None:
    # a finished sweep's folder is read as plain files (covid_tune.report.build on a laptop without a cluster)
    assert _loaded(module, ("ray",)) == [], f"import covid_tune.{module} loaded Ray"
