"""Paired comparisons (McNemar) and ASHA's cuts in the report, on hand-made result rows (no Ray)."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pandas as pd
import pytest
from conftest import parse_markdown_table

from covid_tune.report.build import write_report
from covid_tune.results import stats
from covid_tune.results.collect import HISTORY_KEYS
from covid_tune.spec.load import validate
from covid_tune.spec.sections import TRAINER_AXES


def exact_mcnemar_by_hand(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial(n, 1/2) tail of the discordant pairs."""
    n = a_only + b_only
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n)


def outcomes(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[int], list[int]]:
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


@pytest.mark.parametrize("counts", [(20, 6, 1, 3), (5, 9, 1, 0), (10, 3, 3, 4), (7, 0, 0, 2), (0, 0, 12, 1)])
def test_mcnemar_exact_matches_the_binomial_tail(counts: tuple) -> None:
    a, b = outcomes(*counts)
    res = stats.mcnemar_exact(a, b)
    assert (res["a_only"], res["b_only"]) == counts[1:3]
    assert res["p"] == pytest.approx(exact_mcnemar_by_hand(*counts[1:3]), rel=1e-12)
    assert stats.mcnemar_exact(b, a)["p"] == pytest.approx(res["p"])  # symmetric


def test_mcnemar_known_values_and_shape_check() -> None:
    assert stats.mcnemar_exact(*outcomes(20, 6, 1, 3))["p"] == pytest.approx(0.125)  # 2 * 8 / 128
    assert stats.mcnemar_exact(*outcomes(0, 9, 1, 0))["p"] == pytest.approx(0.021484375)  # 2 * 11 / 1024
    with pytest.raises(ValueError, match="same images"):
        stats.mcnemar_exact([1, 0], [1, 0, 1])


def test_clopper_pearson_interval() -> None:
    lo, hi = stats.proportion_ci(0.55, 20)  # 11 of 20
    assert (lo, hi) == pytest.approx((0.3153, 0.7694), abs=1e-4)


def _history(val_accs: list[float]) -> list[dict]:
    return [{**dict.fromkeys(HISTORY_KEYS, 0.5), "epoch": e, "val_acc": v, "val_loss": 1 - v}
            for e, v in enumerate(val_accs, 1)]


def _row(sr: int, group: str, seed: int, correct: list[int], val_accs: list[float], epochs_max: int = 4) -> dict:
    history = _history(val_accs)
    best = max(history, key=lambda h: (h["val_acc"], -h["epoch"]))
    split = {"loss": 0.5, "acc": sum(correct) / len(correct), "f1": 0.5, "f1_macro": 0.5, "f1_weighted": 0.5,
             "f1_per_class": [0.5, 0.5], "confusion": [[1, 1], [1, 1]], "n": len(correct), "acc_ci95": [0.4, 0.6]}
    row = {"sr": sr, "config_id": f"{group}-s{seed}", "group": group, "backbone": "tiny_cnn", "freeze": "none",
           "layers": group, "loss": "ce", "seed": seed, "epochs_max": epochs_max, "epochs_trained": len(history),
           "best_epoch": best["epoch"], "select_score": best["val_acc"], "stopped_early": len(history) < epochs_max,
           "status": "ok", "checkpoint": None, "history": history, "node": None, "node_ip": None, "node_id": None,
           "eval": {"train": dict(split), "validation": dict(split), "test": {**split, "correct": correct}}}
    row.update(dict.fromkeys(TRAINER_AXES, 0.01))
    return row


def _report(tmp_path: Path, tiny_raw: dict, rows: list[dict]) -> tuple[str, Path]:
    spec = validate({**tiny_raw, "scheduler": {"metric": "val_acc", "grace_period": 1}})
    counts = {"train": {"infected": 10, "normal": 10}, "validation": {"infected": 10, "normal": 10},
              "test": {"infected": 20, "normal": 20}}
    path = write_report(tmp_path / "out", spec, rows, ["infected", "normal"], counts)
    return path.read_text(), path.parent


def test_identical_configurations_are_indistinguishable_and_a_cut_row_shows_its_rung(tmp_path: Path,
                                                                                    tiny_raw: dict) -> None:
    good = [1] * 34 + [0] * 6
    bad = [0] * 20 + [1] * 14 + [0] * 6  # loses 20 of the best's images, wins none
    rows = [_row(1, "best", 0, good, [0.60, 0.55, 0.80, 0.75]),
            _row(2, "twin", 0, list(good), [0.60, 0.55, 0.70, 0.70]),
            _row(3, "late", 0, bad, [0.50, 0.50]),     # cut at 2, inside the best's interval there
            _row(4, "hopeless", 0, bad, [0.10, 0.10])]  # cut at 2, far below it
    md, report = _report(tmp_path, tiny_raw, rows)
    line = next(ln for ln in md.splitlines() if ln.startswith("vs best:"))
    assert "`best`" in line and "indistinguishable from the best at p >= 0.05: `twin`." in line
    table = parse_markdown_table(md, "Accuracy")
    assert list(table["vs best: p"]) == ["best", "1.000", "<0.001", "<0.001"]
    stopped = parse_markdown_table(md, "Stopped early by ASHA")
    assert list(stopped["config_id"]) == ["late-s0", "hopeless-s0"]
    assert list(stopped["Cut at epoch"]) == ["2", "2"]
    assert list(stopped["Last val acc (%)"]) == ["50.00", "10.00"]
    # the best had 0.55 at epoch 2 on 20 validation images: exact 95% interval [31.53, 76.94]
    assert set(stopped["Best's val acc there (%) [95% CI]"]) == {"55.00 [31.53, 76.94]"}
    assert list(stopped["Verdict"]) == ["not ruled out", "worse"]
    csv = pd.read_csv(report / "results.csv")
    assert csv["vs_best_p"].iloc[1] == 1.0
    assert csv["vs_best_p"].iloc[2] == pytest.approx(exact_mcnemar_by_hand(0, 20))
    data = json.loads((report / "results.json").read_text())
    assert data["best_group"] == "best" and data["indistinguishable_from_best"] == ["twin"]
    assert data["rows"][2]["eval"]["test"]["correct"] == bad  # per-image outcomes kept for paired tests
    assert "correct" not in data["rows"][0]["eval"]["train"]
    assert [s["rung"] for s in data["stopped"]] == [2, 2]


def test_seeds_are_paired_seed_by_seed() -> None:
    b0, b1 = [1] * 10 + [0] * 10, [1] * 15 + [0] * 5
    # group "g": seed 0 wins 3 images the best's seed 0 loses; seed 1 loses 6 the best's seed 1 wins
    g0 = b0[:10] + [1] * 3 + [0] * 7
    g1 = [1] * 9 + [0] * 6 + [0] * 5
    rows = [_row(1, "b", 0, b0, [0.9]), _row(2, "b", 1, b1, [0.8]),
            _row(3, "g", 0, g0, [0.5]), _row(4, "g", 1, g1, [0.5])]
    best, comp = stats.compare_to_best(rows, "val_acc", "max")
    assert best == "b"  # mean validation 0.85 vs 0.5
    c = comp["g"]
    assert (c["a_only"], c["b_only"], c["seeds"]) == (3, 6, 2)
    assert c["p"] == pytest.approx(exact_mcnemar_by_hand(3, 6))
    assert c["per_seed"] == {"0": pytest.approx(exact_mcnemar_by_hand(3, 0)),
                             "1": pytest.approx(exact_mcnemar_by_hand(0, 6))}
    assert comp["b"]["p"] == 1.0 and stats.indistinguishable(comp, best) == ["g"]
    # seeds against each other: b's seeds differ on 5 images (seed 1 right each time)
    agree = stats.seed_agreement(rows)
    assert agree["b"] == {"min_p": pytest.approx(exact_mcnemar_by_hand(0, 5)), "seeds": [0, 1], "pairs": 1}
    g_a = sum(x and not y for x, y in zip(g0, g1))
    g_b = sum(y and not x for x, y in zip(g0, g1))
    assert agree["g"]["min_p"] == pytest.approx(exact_mcnemar_by_hand(g_a, g_b))


def test_images_per_split_counts_images_not_labels(tmp_path: Path, tiny_raw: dict) -> None:
    """A multi-label table counts each image once per label it carries: REPORT.md's sizes are images."""
    spec = validate({**tiny_raw, "scheduler": {"metric": "val_acc", "grace_period": 1}})
    rows = [_row(1, "best", 0, [1] * 30 + [0] * 10, [0.6, 0.7])]
    per_label = {"train": {"infected": 12, "normal": 10}, "validation": {"infected": 12, "normal": 10},
                 "test": {"infected": 25, "normal": 20}}  # some images carry both labels
    sizes = {"train": 20, "validation": 20, "test": 40}
    md = write_report(tmp_path / "out", spec, rows, ["infected", "normal"], per_label, sizes=sizes).read_text()
    assert "Images per split: train 20; validation 20; test 40." in md
