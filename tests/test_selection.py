"""Best-epoch rules and the scheduler's hedges: spec keys, Ray's ASHA as built from them."""

from __future__ import annotations

import numpy as np
import pytest

from covid_tune import results
from covid_tune.selection import pick_epoch, score_at, smooth
from covid_tune.spec import SpecError, asha_rungs, validate
from covid_tune.tuning import make_scheduler

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
        assert sorted(m for m, _ in bracket._rungs) == asha_rungs(2, 2, 8, s) == [2 * 2 ** (k + s) for k in range(3 - s)]
    defaults = make_scheduler(validate({**tiny_raw, "scheduler": {"metric": "val_loss"}}))
    assert defaults._max_t == 12 and defaults._stop_last_trials is True and len(defaults._brackets) == 1


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
