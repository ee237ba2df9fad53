"""Issue 31: sampled grid axes (random, optuna), augmentation settings, the search report section."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO

from covid_tune.data.augment import COURSE, LIGHT, augment_label, augment_settings
from covid_tune.spec.load import SpecError, validate
from covid_tune.spec.plan import cells, expand, plan_table, readable, search_summary, with_trial_values


def sampled(raw: dict, algorithm: str = "random", samples: int = 3, seed: int = 7) -> dict:
    raw = copy.deepcopy(raw)
    raw["grid"].update(seed=[0, 1], lr={"loguniform": [1.0e-4, 1.0e-2]}, dropout={"uniform": [0.0, 0.5]},
                       batch_size={"choice": [8, 16]})
    raw["search"] = {"algorithm": algorithm, "samples": samples, "seed": seed}
    return raw


def test_a_random_search_expands_to_cells_x_samples_x_seeds_within_the_ranges(tiny_raw: dict) -> None:
    plan = expand(validate(sampled(tiny_raw)))
    assert len(plan) == 2 * 3 * 2  # 2 freeze levels x 3 samples x 2 seeds
    assert list(cells(plan)) == ["tiny_cnn-fc_only-ce", "tiny_cnn-none-ce"]
    for cid, h in plan.items():
        assert cid == f"{h.group}-s{h.seed}" and h.group.rsplit("-n", 1)[1] in {"0", "1", "2"}
        assert 1e-4 <= h.lr <= 1e-2 and 0.0 <= h.dropout <= 0.5 and h.batch_size in (8, 16)
    by_group = {}
    for h in plan.values():  # the seeds of a sample train the same setting
        by_group.setdefault(h.group, set()).add((h.lr, h.dropout, h.batch_size))
    assert all(len(v) == 1 for v in by_group.values()) and len({next(iter(v)) for v in by_group.values()}) == 6
    again = expand(validate(sampled(tiny_raw)))
    assert [(h.lr, h.dropout, h.batch_size) for h in again.values()] == [
        (h.lr, h.dropout, h.batch_size) for h in plan.values()]
    other = expand(validate(sampled(tiny_raw, seed=8)))
    assert [h.lr for h in other.values()] != [h.lr for h in plan.values()]


def test_sampled_floats_read_to_3_significant_digits_and_typed_ones_as_typed(tiny_raw: dict) -> None:
    assert [readable(v) for v in (0.005023417, 0.001, 3e-05, 0.0125, 123456.7, 16, "light")] == [
        "0.00502", "0.001", "3e-05", "0.0125", "1.23e+05", "16", "light"]
    plan = expand(validate(sampled(tiny_raw)))
    table = plan_table(plan)
    for h in plan.values():
        assert f" {h.lr:.3g} " in table and repr(h.lr) not in table


def test_optuna_plans_the_slots_and_leaves_the_values_to_the_searcher(tiny_raw: dict) -> None:
    spec = validate(sampled(tiny_raw, "optuna", samples=2))
    plan = expand(spec)
    assert list(plan)[:4] == ["tiny_cnn-fc_only-ce-n0-s0", "tiny_cnn-fc_only-ce-n0-s1", "tiny_cnn-fc_only-ce-n1-s0",
                              "tiny_cnn-fc_only-ce-n1-s1"]
    text = search_summary(spec, plan)
    assert "2 grid cell(s) x 2 sample(s) x 2 seed(s) = 8 trial(s)" in text
    assert "lr ~ loguniform[0.0001, 0.01]" in text and "batch_size ~ choice[8, 16]" in text
    hp = with_trial_values(plan["tiny_cnn-none-ce-n1-s0"], {"lr": 0.003, "batch_size": 16.0, "augment": "light"})
    assert (hp.lr, hp.batch_size, hp.augment) == (0.003, 16, "light") and isinstance(hp.batch_size, int)


@pytest.mark.parametrize(("axis", "value", "message"), [
    ("lr", {"loguniform": [0.01, 0.001]}, "grid.lr: loguniform [0.01, 0.001]: low must be below high"),
    ("weight_decay", {"loguniform": [0.0, 0.1]}, "grid.weight_decay: loguniform [0, 0.1]: a log scale needs low > 0"),
    ("lr", {"normal": [0.0, 1.0]}, "grid.lr: unknown distribution 'normal' (allowed: exactly one of loguniform"),
    ("dropout", {"uniform": [0.0, 1.5]}, "grid.dropout: uniform[0, 1.5]: Input should be less than 1"),
    ("optimizer", {"uniform": [0.0, 1.0]}, "grid.optimizer: uniform draws numbers; optimizer takes choice"),
])
def test_a_bad_distribution_is_one_message(tiny_raw: dict, axis: str, value: dict, message: str) -> None:
    raw = sampled(tiny_raw)
    raw["grid"][axis] = value
    with pytest.raises(SpecError) as err:
        validate(raw)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(message), lines


def test_distributions_and_the_search_algorithm_must_agree(tiny_raw: dict) -> None:
    raw = sampled(tiny_raw, "grid")
    with pytest.raises(SpecError, match="grid.lr: a distribution needs search.algorithm random or optuna"):
        validate(raw)
    raw = copy.deepcopy(tiny_raw)
    raw["search"] = {"algorithm": "optuna"}
    with pytest.raises(SpecError, match="no grid axis is a distribution"):
        validate(raw)


def test_augmentation_presets_mappings_and_the_old_switch(tiny_raw: dict) -> None:
    assert augment_settings(True) == augment_settings("course") == COURSE and augment_settings(False) is None
    assert augment_settings("light") == LIGHT and (LIGHT.degrees, LIGHT.scale) == (15.0, (0.7, 1.0))
    custom = {"rotation": 10, "scale": [0.5, 1.0], "flip": True}
    assert augment_settings(custom).degrees == 10 and augment_label(custom) == "r10s0.5-1f"
    raw = copy.deepcopy(tiny_raw)
    raw["grid"]["augment"] = ["none", "light", custom]
    plan = expand(validate(raw))
    assert len(plan) == 2 * 3 and "tiny_cnn-none-ce-auglight-s0" in plan and "tiny_cnn-none-ce-augr10s0.5-1f-s0" in plan
    assert plan["tiny_cnn-none-ce-augr10s0.5-1f-s0"].augment["rotation"] == 10
    raw["grid"]["augment"] = ["heavy"]
    with pytest.raises(SpecError, match=r"grid.augment.0: 'heavy' is not an augmentation \(allowed: none, light"):
        validate(raw)


def test_the_importance_table_ranks_the_setting_that_drives_the_score_first() -> None:
    from covid_tune.report.search import importance
    from covid_tune.spec.sections import Distribution

    rng = np.random.default_rng(0)
    dists = {"lr": Distribution(loguniform=(1e-4, 1e-1)), "dropout": Distribution(uniform=(0.0, 0.5))}
    points = []
    for _ in range(40):
        lr, dropout = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-1)))), float(rng.uniform(0, 0.5))
        points.append({"lr": lr, "dropout": dropout, "score": -abs(np.log10(lr) + 2.5) + rng.normal(0, 0.01)})
    for method in ("fanova", "permutation"):
        got = importance(points, dists, method)
        assert list(got)[0] == "lr" and got["lr"] > 3 * got["dropout"], (method, got)


# --- end to end, through Ray ------------------------------------------------------------------


# Both sweeps in one process and one Ray session (Ray and torch start once): the test's stand-in for
# tuning.disconnect leaves the Ray the first run started for the second; the script stops it at the end.
BOTH_RUNS = """
import sys
import ray
from covid_tune.cli.main import main
from covid_tune.sweep import tuning
tuning.disconnect = lambda: None
try:
    codes = [main(["run", path, "-q"]) for path in sys.argv[1:]]
finally:
    ray.shutdown()
sys.exit(max(codes))
"""


@pytest.mark.slow
def test_optuna_and_random_run_end_to_end_with_asha(tiny_raw: dict, tmp_path: Path) -> None:
    """Both searches on tiny synthetic data, ASHA on (a rung at epoch 1 of 2): each trial's params.json and
    progress.csv carry its sampled values, within their ranges; REPORT.md has the search section and shows
    the sampled learning rates (3 significant digits) in its tables."""
    raws = {}
    for algorithm in ("optuna", "random"):
        raw = sampled(tiny_raw, algorithm, samples=2)
        raw["grid"].update(freeze=["none"], seed=[0])
        raw["grid"].pop("batch_size")
        raw["data"]["synthetic"].update(train=12, validation=6, test=6)
        raw["output"] = str(tmp_path / algorithm)
        raw["report"] = {"gradcam": {"per_class": 0}, "shortcut_check": False}
        (tmp_path / f"{algorithm}.yaml").write_text(yaml.safe_dump(raw))
        raws[algorithm] = raw
    proc = subprocess.run([sys.executable, "-c", BOTH_RUNS, *(str(tmp_path / f"{a}.yaml") for a in raws)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for algorithm, raw in raws.items():
        out = Path(raw["output"])
        params = [json.loads(p.read_text()) for p in (out / "ray" / "tiny").glob("*/params.json")]
        assert sorted(p["config_id"] for p in params) == sorted(expand(validate(raw))), algorithm
        assert len(params) == 2
        for p in params:
            assert 1e-4 <= p["lr"] <= 1e-2 and 0 <= p["dropout"] <= 0.5
        assert len({(p["lr"], p["dropout"]) for p in params}) == 2  # two samples, two settings
        progress = next((out / "ray" / "tiny").glob("*/progress.csv")).read_text().splitlines()[0]
        assert "hp/lr" in progress and "hp/dropout" in progress
        table = pd.read_csv(out / "report" / "results.csv").set_index("config_id")
        md = (out / "report" / "REPORT.md").read_text()
        assert "## Search" in md and "### Best sample per grid cell" in md, algorithm
        assert (out / "report" / "figures" / "search_parallel.png").is_file()
        accuracy = md.split("## Accuracy")[1].split("## F1-score")[0]
        for p in params:  # the tables show 3 significant digits; results and params.json keep them all
            assert f"{p['lr']:.3g}" in accuracy, (p["lr"], accuracy)
            assert table.loc[p["config_id"], "lr"] == p["lr"] and table.loc[p["config_id"], "dropout"] == p["dropout"]


def test_the_optuna_searcher_resumes_from_its_saved_state_without_repeating_a_trial(tiny_raw: dict,
                                                                                   tmp_path: Path) -> None:
    """Tune saves the searcher with its experiment state (searcher-state-*.pkl) and restores it on --resume:
    the restored searcher goes on with the slots not handed out, each seed of a sample gets its values, and a
    slot whose trial started after the save (its params.json is there) is not handed out again."""
    from ray.tune.search import Searcher

    from covid_tune.sweep.search import cell_search

    spec = validate(sampled(tiny_raw, "optuna", samples=2))
    plan = expand(spec)
    first = cell_search(spec, plan)
    got = [first.suggest(f"t{i}") for i in range(3)]
    assert [c["config_id"] for c in got] == list(plan)[:3]
    assert {k: got[0][k] for k in ("lr", "dropout")} == {k: got[1][k] for k in ("lr", "dropout")}
    for i in (0, 1):
        first.on_trial_complete(f"t{i}", {"val_loss": 0.5 + i})
    first.save_to_dir(str(tmp_path), session_str="x")
    assert list(tmp_path.glob("searcher-state-*.pkl"))
    started = tmp_path / "t3_dir"
    started.mkdir()
    (started / "params.json").write_text(json.dumps({"config_id": list(plan)[3]}))  # began after the save
    again = cell_search(spec, plan)
    again.restore_from_dir(str(tmp_path))
    rest = []
    while (c := again.suggest(f"r{len(rest)}")) not in (None, Searcher.FINISHED):
        rest.append(c["config_id"])
    assert rest == list(plan)[4:]
    again.on_trial_complete("t2", {"val_loss": 0.4})  # a trial handed out before the save ends after it


def test_folds_compose_with_samples_every_fold_of_a_sample_trains_its_setting(tiny_raw: dict) -> None:
    raw = sampled(tiny_raw, samples=2)
    raw["data"] = {**raw["data"], "folds": 2, "group_by": "none"}
    raw["grid"]["freeze"] = ["none"]
    spec = validate(raw)
    plan = expand(spec)
    assert list(plan) == [f"tiny_cnn-none-ce-n{k}-f{f}-s{s}" for k in (0, 1) for f in (0, 1) for s in (0, 1)]
    for group in ("tiny_cnn-none-ce-n0", "tiny_cnn-none-ce-n1"):
        members = [h for h in plan.values() if h.group == group]
        assert {h.fold for h in members} == {0, 1} and len({(h.lr, h.dropout) for h in members}) == 1
    assert "2 fold(s) = 8 trial(s)" in search_summary(spec, plan)


@pytest.mark.slow
def test_an_optuna_sweep_killed_mid_search_resumes_with_no_trial_repeated(tmp_path: Path) -> None:
    # two trials run at once on 2 CPUs: the kill lands before the third sample is asked for, so the
    # resumed sweep must restore the searcher and hand out only that one
    from test_faults_resume import Driver, assert_each_epoch_once, reported, sweep_spec, wait_until

    epochs = 4
    path = sweep_spec(tmp_path, epochs, train=200)
    raw = yaml.safe_load(path.read_text())
    raw["grid"].update(seed=[0], lr={"loguniform": [1.0e-3, 1.0e-1]})
    raw["search"] = {"algorithm": "optuna", "samples": 3, "seed": 0}
    path.write_text(yaml.safe_dump(raw))
    out = Path(raw["output"])
    experiment = out / "ray" / "faults"

    def sampled_lr() -> dict[str, float]:
        found = {}
        for params in experiment.glob("*/params.json"):
            p = json.loads(params.read_text())
            found.setdefault(p["config_id"], []).append(p["lr"])
        return found

    first = Driver(path, log=tmp_path / "run0.log")
    try:
        wait_until(lambda: reported(experiment) >= 1 or first.proc.poll() == 0, first, "an epoch reported")
    finally:
        first.kill()
    assert first.proc.returncode != 0, "the sweep finished before the kill: make its epochs longer"
    before = sampled_lr()
    resumed = Driver(path, "--resume", log=tmp_path / "run1.log")
    try:
        assert resumed.wait() == 0, resumed.text()[-4000:]
    finally:
        resumed.kill()
    after = sampled_lr()
    ids = [f"tiny_cnn-none-ce-n{k}-s0" for k in range(3)]
    assert sorted(after) == ids and all(len(v) == 1 for v in after.values()), after  # no trial run twice
    assert all(after[cid] == lrs for cid, lrs in before.items())  # a restored trial keeps its sample
    assert len({v[0] for v in after.values()}) == 3 and all(1e-3 <= v[0] <= 1e-1 for v in after.values())
    assert_each_epoch_once(experiment, epochs)
    assert all(t["status"] == "ok" for t in json.loads((out / "trials.json").read_text()).values())
