"""Model cards: ``best/<config_id>/MODEL_CARD.md`` for each exported model, written with the report.

Every number is the one ``report/results.json`` holds for that configuration (the row, its evaluation,
the shortcut check), so a card never disagrees with the report.
"""

from __future__ import annotations

from pathlib import Path

from covid_tune.spec.load import Spec

CARD_FILE = "MODEL_CARD.md"
NOT_CLINICAL = ("**Not for clinical use.** For research, teaching and software testing only: it is not a "
                "medical device, has not been validated on patients, and must not be used to diagnose, "
                "screen for or rule out COVID-19, pneumonia or any other condition.")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _data_lines(spec: Spec, row: dict, counts: dict, classes: list[str]) -> list[str]:
    data = spec.data
    if data.synthetic is not None:
        s = data.synthetic
        source = (f"generated (synthetic) chest-X-ray-like images, seed {s.seed}, {s.image_size} px; "
                  "no patient data")
    else:
        source = f"image folder `{data.root}`"
    lines = [f"- Source: {source}.", f"- Label mode: {data.label_mode}-label; classes: "
             + ", ".join(f"`{c}`" for c in classes) + "."]
    if data.class_map:
        lines.append("- Class map: " + ", ".join(f"`{k}` -> `{v}`" for k, v in data.class_map.items()) + ".")
    for split, per_class in counts.items():
        lines.append(f"- {split}: {sum(per_class.values())} images ("
                     + ", ".join(f"{c} {n}" for c, n in per_class.items()) + ").")
    sources = row.get("test_by_source")
    if sources:
        lines.append("- Sources present in the test split (manifest.csv): "
                     + ", ".join(f"{g} ({v['n']} images, accuracy {_pct(v['acc'])})" for g, v in sources.items())
                     + ".")
    return lines


def _training_lines(spec: Spec, row: dict) -> list[str]:
    t, d = spec.trainer, spec.data
    stopped = " (stopped early by ASHA)" if row.get("stopped_early") else ""
    return [
        f"- Backbone `{row['backbone']}`, freeze level `{row['freeze']}` ({row['layers']}), weights `{t.weights}`, "
        f"head hidden {row['head_hidden']}, dropout {row['dropout']}.",
        f"- Loss `{row['loss']}`, optimizer `{row['optimizer']}`, learning rate {row['lr']} "
        f"(schedule `{row['lr_schedule']}`), momentum {row['momentum']}, weight decay {row['weight_decay']}, "
        f"batch size {row['batch_size']}, seed {row['seed']}.",
        f"- Images {d.image_size} px, grayscale {d.grayscale}, augmentation {row.get('augment', 'course')}.",
        f"- Epochs trained {row['epochs_trained']} of {row['epochs_max']}{stopped}; selected epoch "
        f"{row['best_epoch']} by `{spec.scheduler.metric}` (rule `{spec.scheduler.select}`, score "
        f"{_num(row.get('select_score'))}).",
    ]


def _metric_lines(row: dict) -> list[str]:
    ev = row.get("eval") or {}
    lines = ["| split | n | accuracy | 95% CI | macro F1 | loss |", "|---|---|---|---|---|---|"]
    for split in ("train", "validation", "test"):
        m = ev.get(split)
        if not m:
            continue
        ci = m.get("acc_ci95")
        lines.append(f"| {split} | {m.get('n', '-')} | {_pct(m.get('acc'))} | "
                     + (f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "-")
                     + f" | {_pct(m.get('f1_macro', m.get('f1')))} | {_num(m.get('loss'))} |")
    return lines + ["", "95% CI: bootstrap interval of the accuracy over the split's images. Train is evaluated "
                        "without augmentation."]


def _shortcut_lines(row: dict) -> list[str]:
    c = row.get("shortcut")
    if not c:
        return ["Not run for this model (`report.shortcut_check` off)."]
    verdict = ("**Flagged**: with the lungs hidden it stays far above the majority-class rate, so it reads "
               "something other than the lungs; its accuracy does not show that it detects disease."
               if c["flagged"] else "Not flagged: with the lungs hidden it falls to near the majority-class rate.")
    return [verdict, "",
            f"Test accuracy as is {_pct(c['acc_plain'])}, lungs hidden {_pct(c['acc_hidden'])} (95% CI low "
            f"{_pct(c['acc_hidden_ci_low'])}), lungs only {_pct(c['acc_lungs_only'])}, majority rate "
            f"{_pct(c['majority_rate'])}; Grad-CAM mass in the lung box "
            f"{_pct(c.get('cam_mass_inside'))} (box {100 * c['box_width']:.0f}% x {100 * c['box_height']:.0f}%)."]


def card_text(spec: Spec, row: dict, classes: list[str], counts: dict, best_group: str | None) -> str:
    """One model's card (Markdown)."""
    chosen = " It is the sweep's chosen configuration." if row.get("group") == best_group else ""
    md = [f"# Model card: `{row['config_id']}`", "",
          f"From the sweep `{spec.name}`: configuration {row['sr']} of the grid, exported at its selected epoch "
          f"as `model.pt` (a plain PyTorch state_dict; frozen layers, where any, in `frozen.pt`) with `model.json`."
          f"{chosen} Numbers from "
          "`report/results.json`.", "", NOT_CLINICAL, "",
          "## Intended use", "",
          "Studying how backbone, freeze level, loss and training settings change a chest X-ray classifier "
          "(the course assignment covid_tune starts from), and testing software around such models. Not for "
          "decisions about people.", "",
          "## Data", "", *_data_lines(spec, row, counts, classes), "",
          "## Training", "", *_training_lines(spec, row), "",
          "## Metrics", "", *_metric_lines(row), "",
          "## Shortcut check", "", *_shortcut_lines(row), "",
          "## Limitations", "",
          "- Small public collections mix hospitals, devices and patient groups with the label: a model can "
          "learn the source instead of the disease (see the shortcut check and the per-source accuracy).",
          "- Intervals are over the test images of this one split; performance elsewhere is unknown.", ""]
    return "\n".join(md)


def write_cards(out: Path, spec: Spec, rows: list[dict], classes: list[str], counts: dict,
                best_group: str | None) -> list[Path]:
    """``best/<config_id>/MODEL_CARD.md`` for every row with an exported model; the paths written."""
    written = []
    for row in rows:
        folder = out / "best" / row["config_id"]
        if row.get("checkpoint") is None or not folder.is_dir():
            continue
        path = folder / CARD_FILE
        path.write_text(card_text(spec, row, classes, counts, best_group))
        written.append(path)
    return written


def markdown(out: Path, cards: list[Path]) -> list[str]:
    """REPORT.md's section linking the cards (paths relative to ``out/report``)."""
    if not cards:
        return []
    return ["## Model cards", "",
            "One per exported model (data, training settings, metrics with intervals, shortcut check, intended "
            "use; not for clinical use): "
            + ", ".join(f"[{p.parent.name}](../{p.relative_to(out).as_posix()})" for p in cards) + ".", ""]
