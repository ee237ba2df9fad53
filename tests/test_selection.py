"""Best-epoch rules and the scheduler's hedges: spec keys, Ray's ASHA as built from them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from covid_tune.engine import schedule
from covid_tune.engine.schedule import asha_rungs
from covid_tune.results import collect as results
from covid_tune.results.selection import pick_epoch, score_at, smooth
from covid_tune.spec.load import SpecError, validate
from covid_tune.sweep.tuning import make_scheduler

# a noisy validation curve: a lone spike at epoch 3, a steady plateau at epochs 6-8
CURVE = [0.60, 0.62, 0.80, 0.64, 0.70, 0.76, 0.78, 0.77, 0.70]
HISTORY = [{"epoch": e, "val_acc": v, "val_loss": 1 - v} for e, v in enumerate(CURVE, 1)]


def test_raw_best_takes_the_spike_smoothed_rules_take_the_plateau() -> None:
    assert pick_epoch(HISTORY, "val_acc", "max", "best") == 3
    assert pick_epoch(HISTORY, "val_acc", "max", "mean3") == 7
    # EMA alpha 0.5 by hand
    ema, acc = [], None
    for v in CURVE:
        acc = v if acc is None else 0.5 * v + 0.5 * acc
        ema.append(acc)
    assert smooth(CURVE, "ema") == pytest.approx(ema)
    assert pick_epoch(HISTORY, "val_acc", "max", "ema") == int(np.argmax(ema)) + 1 == 8  # the EMA lags
    # min mode on the loss picks the same epochs
    assert pick_epoch(HISTORY, "val_loss", "min", "mean3") == 7
    assert score_at(HISTORY, "val_acc", "mean3", 7) == pytest.approx((0.76 + 0.78 + 0.77) / 3)


def test_selection_only_among_kept_checkpoints_and_ties_go_early() -> None:
    assert pick_epoch(HISTORY, "val_acc", "max", "mean3", candidates=[1, 2, 3]) == 3
    flat = [{"epoch": e, "val_acc": 0.5} for e in (1, 2, 3)]
    assert pick_epoch(flat, "val_acc", "max", "ema") == 1
    assert pick_epoch([], "val_acc", "max") is None
    rec = results.TrialRecord("c", None, HISTORY, checkpoints={6: None, 7: None})
    assert results.best_epoch(rec, "val_acc", "max") == 7
    assert results.best_epoch(rec, "val_acc", "max", "ema") == 7  # 8 is not kept


def test_asha_hedges_reach_rays_scheduler(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["epochs"] = 12
    tiny_raw["scheduler"].update(grace_period=2, reduction_factor=2, brackets=2, max_t=8, stop_last_trials=False,
                                 select="ema")
    spec = validate(tiny_raw)
    assert (spec.scheduler.brackets, spec.scheduler.max_t, spec.scheduler.select) == (2, 8, "ema")
    sched = make_scheduler(spec)
    assert sched._max_t == 8 and sched._stop_last_trials is False and len(sched._brackets) == 2
    # our rung formula is Ray's
    for s, bracket in enumerate(sched._brackets):
        expected = [2 * 2 ** (k + s) for k in range(3 - s)]
        assert sorted(m for m, _ in bracket._rungs) == asha_rungs(2, 2, 8, s) == expected
    defaults = make_scheduler(validate({**tiny_raw, "scheduler": {"metric": "val_loss"}}))
    assert defaults._max_t == 12 and defaults._stop_last_trials is True and len(defaults._brackets) == 1
    # the rungs the dry run and the console show are those of the scheduler Tune gets: none past max_t
    early = validate({**tiny_raw, "scheduler": {**tiny_raw["scheduler"], "max_t": 4, "brackets": 1}})
    assert make_scheduler(early)._max_t == 4
    assert early.asha_rung_epochs() == ([2, 4], "")
    no_max_t = {"metric": "val_loss", "grace_period": 2, "reduction_factor": 2}
    assert validate({**tiny_raw, "scheduler": no_max_t}).asha_rung_epochs() == ([2, 4, 8], "")


def _judged(sched, trial_id: str, freeze: str, grace, accs: list[float]) -> list[str]:
    """Feed Ray's scheduler one trial's epochs (as train_trial reports them); its decision after each."""
    trial = SimpleNamespace(trial_id=trial_id)  # all ASHA reads of a Trial
    sched.on_trial_add(None, trial)
    return [sched.on_trial_result(None, trial, {"epoch": e, "val_acc": a, **schedule.time_metrics(e, grace, freeze)})
            for e, a in enumerate(accs, 1)]


def test_per_level_grace_cuts_each_level_at_its_own_grace(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["epochs"] = 12
    grace = {"fc_only": 4, "none": 8}
    tiny_raw["scheduler"] = {"metric": "val_acc", "grace_period": grace, "reduction_factor": 2}
    spec = validate(tiny_raw)
    sched = make_scheduler(spec)
    sched.set_search_properties("val_acc", "max")  # as the Tuner's TuneConfig does
    assert sched._time_attr == "asha_time" and sorted(m for m, _ in sched._brackets[0]._rungs) == [4, 8]
    assert schedule.rungs_by_level(grace, 2, 12, 12, ["fc_only", "none"]) == {"fc_only": [4, 8], "none": [8]}
    go, stop = "CONTINUE", "STOP"
    assert _judged(sched, "a", "fc_only", grace, [0.9] * 4) == [go] * 4          # sets the bar at rung 4
    assert _judged(sched, "b", "fc_only", grace, [0.5] * 4) == [go] * 3 + [stop]  # fc_only judged at epoch 4
    # the from-scratch trial trails as much, but its first cut is at epoch 8 (asha_time 4), not 4
    assert _judged(sched, "c", "none", grace, [0.5] * 8) == [go] * 7 + [stop]
    # the same trial under one grace of 4 is cut at epoch 4
    tiny_raw["scheduler"]["grace_period"] = 4
    one = make_scheduler(validate(tiny_raw))
    one.set_search_properties("val_acc", "max")
    assert one._time_attr == "epoch"
    _judged(one, "a", "fc_only", 4, [0.9] * 4)
    assert _judged(one, "c", "none", 4, [0.5] * 4) == [go] * 3 + [stop]


@pytest.mark.parametrize("update, needles", [
    ({"select": "median"}, ["scheduler.select", "'best'", "'ema'", "'mean3'"]),
    ({"brackets": 0}, ["scheduler.brackets", "greater than or equal to 1"]),
    ({"brackets": 4}, ["scheduler.brackets (4)", "3 rung(s)", "allowed: 1-3"]),
    ({"max_t": 20}, ["scheduler.max_t (20)", "trainer.epochs (12)", "allowed: 2-12"]),
    ({"max_t": 1}, ["scheduler.max_t (1)", "grace_period (2)"]),
    ({"max_t": 8}, ["scheduler.max_t (8)", "stop_last_trials: false"]),
    ({"stop_last_trials": "sometimes"}, ["scheduler.stop_last_trials", "boolean"]),
])
def test_bad_scheduler_hedges_are_named(tiny_raw: dict, update: dict, needles: list[str]) -> None:
    tiny_raw["trainer"]["epochs"] = 12
    tiny_raw["scheduler"].update(grace_period=2, reduction_factor=2, **update)
    with pytest.raises(SpecError) as info:
        validate(tiny_raw)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_cxr_real_bar_judges_the_chosen_configuration_by_its_mean_over_seeds(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    def row(cid: str, group: str, acc: float) -> dict:
        return {"config_id": cid, "group": group, "eval": {"test": {"acc": acc}}}

    # the chosen group's mean (0.87) misses 0.88 although one of its seeds (0.90) and another group pass it
    res = {"best_group": "a", "rows": [row("a-s0", "a", 0.84), row("a-s1", "a", 0.90), row("b-s0", "b", 0.95)],
           "timing": {"wall_s": 200.0}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "cxr_real.py"
    out = subprocess.run([sys.executable, str(bench), "--results", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "| `a` | 0.840, 0.900 | 0.870 | - | - | 0.88 | 0.90 | MISS | 200 s |" in out and "held-out" in out
    res["rows"][0]["eval"]["test"]["acc"] = 0.88
    path.write_text(json.dumps(res))
    out = subprocess.run([sys.executable, str(bench), "--results", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "| 0.890 | - | - | 0.88 | 0.90 | PASS |" in out
    # a run on another tree (the held-out patients) names it and drops the caveat about our split
    res["data_root"] = str(tmp_path / "held-out")
    path.write_text(json.dumps(res))
    out = subprocess.run([sys.executable, str(bench), "--results", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert f"test split of {tmp_path / 'held-out'}." in out and "looked at" not in out
    bad = subprocess.run([sys.executable, str(bench), "--results", str(path), "--data", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "give one of them" in bad.stderr
