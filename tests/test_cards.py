"""Model cards: best/<id>/MODEL_CARD.md names the numbers of report/results.json."""

from __future__ import annotations

import json

from explain_helpers import fake_sweep

from covid_tune.report.cards import CARD_FILE, NOT_CLINICAL


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def test_each_card_names_its_numbers_of_results_json_and_the_report_links_it(tiny_raw: dict) -> None:
    out = fake_sweep(tiny_raw)
    results = json.loads((out / "report" / "results.json").read_text())
    report = (out / "report" / "REPORT.md").read_text()
    rows = [r for r in results["rows"] if r["checkpoint"]]
    assert len(rows) == 2
    for row in rows:
        card = (out / "best" / row["config_id"] / CARD_FILE).read_text()
        assert card.startswith(f"# Model card: `{row['config_id']}`") and NOT_CLINICAL in card
        assert f"(../best/{row['config_id']}/{CARD_FILE})" in report  # linked from REPORT.md
        test = row["eval"]["test"]
        low, high = test["acc_ci95"]
        assert f"| test | {test['n']} | {pct(test['acc'])} | [{pct(low)}, {pct(high)}] |" in card
        for split in ("train", "validation"):
            assert f"| {split} | {row['eval'][split]['n']} | {pct(row['eval'][split]['acc'])} |" in card
        assert f"selected epoch {row['best_epoch']} by `{results['metric']}`" in card
        assert f"Epochs trained {row['epochs_trained']} of {row['epochs_max']}" in card
        assert f"learning rate {row['lr']}" in card and f"freeze level `{row['freeze']}`" in card
        for split, per_class in results["counts"].items():
            assert f"- {split}: {sum(per_class.values())} images (" in card
        shortcut = row["shortcut"]
        assert ("**Flagged**" in card) == shortcut["flagged"] and ("Not flagged" in card) != shortcut["flagged"]
        assert f"lungs hidden {pct(shortcut['acc_hidden'])}" in card
        chosen = "It is the sweep's chosen configuration." in card
        assert chosen == (row["group"] == results["best_group"])
