"""Issue 36: a report sized for a reader. Beyond ``report.top_k`` configurations REPORT.md details a shortlist
(each group's best on validation plus the top K overall, ties as ``selection.best_of`` breaks them), every
configuration stays in results.csv/json and one compact table, and the figures stay bounded (no training)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, cli_here, parse_markdown_table
from test_stats import _report, _row

from covid_tune.engine.files import MODEL_META
from covid_tune.engine.hparams import HParams
from covid_tune.report.build import write_report
from covid_tune.results import collect, selection, stats
from covid_tune.spec.load import SpecError, validate


def _scored(group: str, seed: int, score: float | None, sr: int = 0) -> dict:
    return {"sr": sr, "config_id": f"{group}-s{seed}", "group": group, "seed": seed, "select_score": score}


def _ids(rows: list[dict], k: int, mode: str = "max") -> list[str]:
    return stats.shortlist(rows, "val_acc", mode, k)


def test_top_breaks_ties_as_best_of() -> None:
    items = [("a", 0.5), ("b", 0.7), ("c", 0.7), ("d", None), ("e", 0.5), ("f", 0.9)]
    ranked = selection.top(items, lambda x: x[1], "max", 10)
    assert [x[0] for x in ranked] == ["f", "b", "c", "a", "e"]  # None left out, equals in order
    assert ranked[0] == selection.best_of(items, lambda x: x[1], "max")
    assert [x[0] for x in selection.top(items, lambda x: x[1], "min", 2)] == ["a", "e"]
    assert selection.top(items, lambda x: x[1], "max", 0) == []


def test_up_to_k_configurations_keep_everything() -> None:
    rows = [_scored("g", s, None if s == 2 else 0.1 * s) for s in range(8)]
    assert _ids(rows, 8) == [r["config_id"] for r in rows]  # unscored ones too: nothing changes
    assert len(_ids(rows, 7)) < 8


def test_each_groups_best_is_in_and_the_top_k_overall() -> None:
    # group a is strong, b weak; c's two best seeds tie (0.6): the earlier (plan order) is its best
    rows = ([_scored("a", s, v) for s, v in enumerate([0.90, 0.95, 0.80, 0.85, 0.95])]
            + [_scored("b", s, v) for s, v in enumerate([0.20, 0.30, 0.10])]
            + [_scored("c", s, v) for s, v in enumerate([0.50, 0.60, 0.60])])
    short = _ids(rows, 3)
    # top 3 overall: a-s1 and a-s4 (0.95, a-s1 first as the earlier of equals), a-s0 (0.90); group bests:
    # a-s1, b-s1, c-s1 (the earlier of c's two 0.6)
    assert short == ["a-s0", "a-s1", "a-s4", "b-s1", "c-s1"]
    # more groups than K: the K best groups by mean (a, c) bring their best, b does not
    assert _ids(rows, 2) == ["a-s1", "a-s4", "c-s1"]
    # a tie at the top-K boundary goes to the earlier configuration
    tie = [_scored("g", s, v) for s, v in enumerate([0.9, 0.8, 0.8])] + [_scored("h", s, v) for s, v in
                                                                        enumerate([0.1, 0.2, 0.2])]
    assert _ids(tie, 2) == ["g-s0", "g-s1", "h-s1"]
    # lower is better for a loss: the groups' bests are then the lowest
    loss = [{**r, "select_score": 1 - r["select_score"]} for r in rows]
    assert _ids(loss, 3, "min") == short


def test_more_groups_than_k_stay_within_2k() -> None:
    rng = random.Random(0)
    rows = [_scored(f"g{g}", s, rng.random()) for g in range(50) for s in range(3)]
    short = _ids(rows, 4)
    assert len(short) <= 8
    means = {f"g{g}": sum(r["select_score"] for r in rows if r["group"] == f"g{g}") / 3 for g in range(50)}
    best4 = sorted(means, key=means.get, reverse=True)[:4]
    for g in best4:  # the K best groups (by mean over seeds) bring their best seed
        mine = [r for r in rows if r["group"] == g]
        assert max(mine, key=lambda r: r["select_score"])["config_id"] in short
    top4 = sorted(rows, key=lambda r: r["select_score"], reverse=True)[:4]
    assert {r["config_id"] for r in top4} <= set(short)
    assert stats.best_group([{**r, "eval": {"test": {"correct": [1]}}} for r in rows], "val_acc", "max") == best4[0]


def test_top_k_is_validated(tiny_raw: dict) -> None:
    assert validate(tiny_raw).report.top_k == 8
    with pytest.raises(SpecError, match=r"report.top_k: Input should be greater than or equal to 1"):
        validate({**tiny_raw, "report": {"top_k": 0}})


def test_a_small_grid_keeps_every_section(tmp_path: Path, tiny_raw: dict) -> None:
    good = [1] * 34 + [0] * 6
    rows = [_row(i + 1, f"g{i}", 0, good, [0.5 + 0.01 * i, 0.6]) for i in range(8)]
    md, report = _report(tmp_path, tiny_raw, rows)
    assert "Shortlist" not in md and "## All configurations" not in md and "Overview" not in md
    assert len(parse_markdown_table(md, "Accuracy")) == 8
    assert not list((report / "figures").glob("overview_*.png"))
    assert len(list((report / "figures").glob("*_acc.png"))) == 8
    assert pd.read_csv(report / "results.csv")["shortlisted"].all()


def _many_rows(n_seeds: int) -> list[dict]:
    """Two groups (lr 0.01 and 0.001 as in the issue's workload), ``n_seeds`` seeds each, ASHA-cut most."""
    rng = random.Random(1)
    rows = []
    for group, level in (("lr0.01", 0.75), ("lr0.001", 0.6)):
        for s in range(n_seeds):
            correct = [int(rng.random() < level) for _ in range(40)]
            epochs = 2 if rng.random() < 0.3 else 1
            rows.append(_row(len(rows) + 1, group, s, correct,
                             [round(level + rng.uniform(-0.2, 0.2), 2) for _ in range(epochs)], epochs_max=2))
    return rows


def test_a_few_hundred_configurations_make_a_report_a_reader_can_read(tmp_path: Path, tiny_raw: dict) -> None:
    rows = _many_rows(150)  # 300 configurations
    start = time.perf_counter()
    md, report = _report(tmp_path, tiny_raw, rows)
    took = time.perf_counter() - start
    pngs = list((report / "figures").glob("*.png"))
    size = (report / "REPORT.md").stat().st_size
    assert len(pngs) <= 60 and size <= 100_000, (len(pngs), size)
    assert took < 60, took
    csv = pd.read_csv(report / "results.csv")
    assert len(csv) == 300 and list(csv["config_id"]) == [r["config_id"] for r in rows]
    assert len(json.loads((report / "results.json").read_text())["rows"]) == 300
    short = set(stats.shortlist(rows, "val_acc", "max", 8))
    assert set(csv.loc[csv["shortlisted"], "config_id"]) == short and len(short) <= 10
    # the compact table has every configuration; the detailed sections only the shortlist
    every = parse_markdown_table(md, "All configurations")
    assert list(every["config_id"]) == [r["config_id"] for r in rows]
    assert set(every.loc[every["Shortlisted"] == "yes", "config_id"]) == short
    assert set(parse_markdown_table(md, "Test accuracy, 95% bootstrap confidence interval")["config_id"]) == short
    assert {p.name for p in pngs if p.name.endswith("_acc.png")} == {f"{c}_acc.png" for c in short}
    assert (report / "figures" / "overview_validation.png").is_file()
    assert (report / "figures" / "overview_scores.png").is_file()
    assert "**Shortlist**" in md and "beyond the shortlist were cut by ASHA" in md
    # a smaller top_k afterwards removes the figures of those no longer shortlisted
    spec = validate({**tiny_raw, "scheduler": {"metric": "val_acc", "grace_period": 1}, "report": {"top_k": 2}})
    write_report(tmp_path / "out", spec, rows, ["infected", "normal"], {"test": {"infected": 20, "normal": 20}})
    fewer = set(stats.shortlist(rows, "val_acc", "max", 2))
    assert {p.name for p in (report / "figures").glob("*_acc.png")} == {f"{c}_acc.png" for c in fewer}
    print(f"\n300 configurations: {len(pngs)} PNGs, REPORT.md {size / 1000:.1f} KB, {took:.1f} s")


def test_assemble_evaluates_only_the_shortlist(tmp_path: Path, monkeypatch) -> None:
    """Beyond top_k every configuration is exported but only the shortlist is evaluated on test."""
    plan = {f"g{g}-s{s}": HParams(backbone="tiny_cnn", freeze="none", loss="ce", group=f"g{g}", seed=s)
            for g in range(2) for s in range(6)}
    scores = {cid: 0.5 + 0.03 * i for i, cid in enumerate(plan)}
    records = {cid: collect.TrialRecord(cid, tmp_path, [{"epoch": 1, "val_acc": v}], {1: tmp_path})
               for cid, v in scores.items()}

    def fake_export(rec, hp, classes, metric, mode, out_dir, pretrained=None, rule="best"):
        target = out_dir / rec.config_id
        target.mkdir(parents=True, exist_ok=True)
        (target / MODEL_META).write_text(json.dumps({"epoch": 1}))
        return target

    asked: list[str] = []

    def evaluator(dirs, index):
        asked.extend(d.name for d in dirs)
        return [{"splits": {"test": {"correct": [1]}}} for _ in dirs]

    monkeypatch.setattr(collect, "collect", lambda experiment: records)
    monkeypatch.setattr(collect, "export_best", fake_export)
    monkeypatch.setattr(collect, "store_operating_point", lambda target, result: None)
    monkeypatch.setattr(collect, "source_groups", lambda index, split: None)
    index = type("Index", (), {"classes": ["a", "b"]})()
    rows = collect.assemble(tmp_path, plan, index, "val_acc", "max", tmp_path / "best",
                            {c: {"status": "ok"} for c in plan}, evaluator, top_k=3)
    # top 3: g1-s5, g1-s4, g1-s3; g0's best: g0-s5
    assert asked == ["g0-s5", "g1-s3", "g1-s4", "g1-s5"]
    assert [r["config_id"] for r in rows if r["shortlisted"]] == asked
    assert all(r["checkpoint"] for r in rows)  # every configuration is exported, so predict finds any
    assert not any("eval" in r for r in rows if not r["shortlisted"])
    asked.clear()
    collect.assemble(tmp_path, plan, index, "val_acc", "max", tmp_path / "best",
                     {c: {"status": "ok"} for c in plan}, evaluator)
    assert len(asked) == 12  # no top_k: every configuration, as before


@pytest.mark.slow
def test_a_sweep_beyond_top_k_reports_predicts_and_rebuilds(tmp_path: Path, tiny_raw: dict, capsys) -> None:
    """4 trials, top_k 2: every model exported, the shortlist (each group's best) evaluated on test;
    ``covid-tune report`` rebuilds it and ``predict`` picks the chosen model."""
    raw = {**tiny_raw, "grid": {**tiny_raw["grid"], "seed": [0, 1]}, "report": {"top_k": 2}}
    raw["trainer"] = {**raw["trainer"], "epochs": 1}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))

    def cli(*args: str) -> subprocess.CompletedProcess:
        # the sweep in a new process; report and predict (no Ray) in this one
        proc = subprocess.run([sys.executable, "-m", "covid_tune", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300) if args[0] == "run" else cli_here(capsys, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    cli("run", str(spec_path))
    out = Path(raw["output"])
    rows = json.loads((out / "report" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all((out / "best" / r["config_id"] / "model.pt").is_file() for r in rows)
    short = [r["config_id"] for r in rows if r["shortlisted"]]
    assert len(short) in (2, 3) and len({r["group"] for r in rows if r["shortlisted"]}) == 2  # each group's best
    assert all(bool(r["eval"]) == r["shortlisted"] for r in rows)
    # beyond top_k nothing is evaluated while trials run (the shortlist is known at the end); after them
    # the shortlist goes to the evaluator pool, which records the worker of each evaluation
    assert json.loads((out / "report" / "results.json").read_text())["timing"]["evaluated_during_trials"] == 0
    assert all(r["eval_worker"]["pid"] > 0 for r in rows if r["shortlisted"])
    assert sorted(p.parent.name for p in (out / "best").glob("*/MODEL_CARD.md")) == sorted(short)
    before = pd.read_csv(out / "report" / "results.csv")
    assert len(before) == 4 and before["test_acc"].notna().sum() == len(short)
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["eval"]["test"]["n"] == 20 for r in rows if r["shortlisted"])
    # rebuilt and used from a copy whose original is gone (a moved folder: test_faults_output's issue 27
    # case 7, merged here to save a sweep): it reads its own trials and data, names no old path
    csv_text = (out / "report" / "results.csv").read_text()
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    shutil.rmtree(moved / "report")
    proc = cli("report", str(moved))
    assert "Traceback" not in proc.stderr
    assert (moved / "report" / "results.csv").read_text() == csv_text.replace(str(out), str(moved))
    again = json.loads((moved / "report" / "results.json").read_text())["rows"]
    assert [(r["config_id"], r["status"], r["shortlisted"]) for r in again] == \
        [(r["config_id"], r["status"], r["shortlisted"]) for r in rows]
    assert all(r["eval"]["test"]["n"] == 20 for r in again if r["shortlisted"])
    assert str(out) not in (moved / "report" / "REPORT.md").read_text()
    assert not out.exists()
    out = moved
    proc = cli("predict", str(out), str(out / "synthetic-data" / "test"), "--csv", str(tmp_path / "pred.csv"))
    best_group = json.loads((out / "report" / "results.json").read_text())["best_group"]
    # the chosen configuration's seeds shipped as one model (report.ensemble auto)
    assert proc.stderr.split("[covid_tune] model ", 1)[1].split()[0] == f"{best_group}-ensemble"
