"""The layering docs/architecture.md describes, enforced on the source as a rule on package names.

Each subpackage of covid_tune is a stage with a rank; a module may import covid_tune modules of its own
rank or lower only. No lists of modules to keep up to date: a new module is checked by being in a package.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "covid_tune"
# data flows spec -> plan -> trials -> results -> report; the engine side (one configuration trained and
# evaluated, called directly) sits below it all and knows nothing of specs, Ray or reports
RANK = {"data": 0, "models": 0, "engine": 0, "spec": 1, "results": 2, "report": 3, "sweep": 4, "cli": 5}
RAY_PACKAGE = "sweep"  # the only package that may import Ray
PRIVATE_RAY_MODULE = "covid_tune.sweep.ray_internals"  # the only module that may name Ray's private API


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def test_every_module_is_in_a_stage() -> None:
    loose = sorted(m for m in MODULES if _stage(m) is None and m not in ("covid_tune.__init__", "covid_tune.__main__"))
    assert not loose, f"modules outside the stage packages {sorted(RANK)}: {loose}"
    assert {_stage(m) for m in MODULES} - {None} == set(RANK)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_stages(module: str) -> None:
    stage = _stage(module)
    if stage is None:
        return
    up = sorted(n for n in MODULES[module] if n.startswith("covid_tune.") and _stage(n) in RANK
                and RANK[_stage(n)] > RANK[stage])
    assert not up, (f"{module} (stage {stage}) imports {up}: a module imports only from its own stage or the ones "
                    f"before it ({' < '.join(sorted(RANK, key=RANK.get))})")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_sweep_imports_ray(module: str) -> None:
    ray = sorted(n for n in MODULES[module] if n == "ray" or n.startswith("ray."))
    if _stage(module) == RAY_PACKAGE:
        return
    assert not ray, f"{module} imports {ray}; only covid_tune.{RAY_PACKAGE} may"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_private_names_only_in_their_module(module: str) -> None:
    text = (PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text()
    # a logger's name in quotes ("ray._private....") is no API: a moved logger only gets louder
    private = [w for w in (r"(?<![\"'])ray\._private", r"\._local_tuner", r"ray\.train\._internal",
                           "__pydantic_decorators__") if re.search(w, text)]
    if module == PRIVATE_RAY_MODULE:
        return
    assert not private, f"{module} names private API {private}; only {PRIVATE_RAY_MODULE} may (with its canary test)"


def _loaded(module: str, watched: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(*sorted(m for m in {watched!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_importing_the_engine_loads_neither_ray_nor_yaml() -> None:
    out = _loaded("covid_tune.engine.training", ("ray", "yaml", "pydantic"))
    assert out == [], f"import covid_tune.engine.training loaded {out}"


@pytest.mark.parametrize("module", ["covid_tune.results.collect", "covid_tune.report.build"])
def test_reading_results_loads_no_ray(module: str) -> None:
    # a finished sweep's folder is read as plain files (covid-tune report on a laptop without a cluster)
    assert _loaded(module, ("ray",)) == [], f"import {module} loaded Ray"
