"""Run a trained model on new images: ``python -m covid_tune.predict TARGET IMAGE_OR_FOLDER...``.

TARGET is a sweep's output folder (its best configuration by the sweep's metric, or ``--config``) or
one exported model folder (``OUTPUT/best/<config_id>``). Images are preprocessed exactly as the test
evaluation did, from ``model.json``. No Ray, and heavy imports only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

MODEL_META, SPEC_FILE = "model.json", "spec.json"  # as models.save_exported / report.save_spec write them
RESULTS_FILE = "report/results.json"  # as report.write_report writes it


class TargetError(ValueError):
    """TARGET is neither a sweep output folder nor an exported model folder."""


def best_model_dir(sweep: Path, config: str | None = None) -> Path:
    """The exported model of ``config``, or of the report's best configuration (``best_group`` in
    ``report/results.json``: the best mean over its seeds on validation) and, among its seeds, the one whose
    best epoch scored best on the sweep's selection metric (the value each ``model.json`` records; ties:
    plan order, as results.best_epoch does for epochs). Without a report: the best of all exported models."""
    from covid_tune.spec import validate

    spec = validate(json.loads((sweep / SPEC_FILE).read_text()))
    metas = {f.parent.name: json.loads(f.read_text()) for f in sorted((sweep / "best").glob(f"*/{MODEL_META}"))}
    if not metas:
        raise TargetError(f"{sweep} is a sweep output folder but holds no exported model (best/*/{MODEL_META}); "
                          f"run `python -m covid_tune.report {sweep}` first")
    if config is not None:
        if config not in metas:
            raise TargetError(f"--config {config}: no exported model; choose one of: {', '.join(metas)}")
        return sweep / "best" / config
    from covid_tune import plan as plan_mod

    order = {cid: i for i, cid in enumerate(plan_mod.expand(spec))}
    metric, sign = spec.scheduler.metric, 1 if spec.scheduler.mode == "max" else -1
    scored = [c for c in metas if metas[c].get("metrics", {}).get(metric) is not None]
    chosen = set(_best_group_ids(sweep)) & set(scored)
    scored = [c for c in scored if c in chosen] if chosen else scored
    if not scored:
        raise TargetError(f"{sweep}: no exported model records {metric}")
    best = max(scored, key=lambda c: (sign * metas[c]["metrics"][metric], -order.get(c, len(order))))
    return sweep / "best" / best


def _best_group_ids(sweep: Path) -> list[str]:
    """The config ids (seeds) of the report's best configuration; [] without a readable report."""
    try:
        results = json.loads((sweep / RESULTS_FILE).read_text())
        best = results["best_group"]
        return [] if best is None else [r["config_id"] for r in results["rows"] if r.get("group") == best]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def resolve_target(target: Path, config: str | None) -> Path:
    """The exported model folder TARGET names (see :func:`best_model_dir`)."""
    if (target / MODEL_META).is_file() and (target / "model.pt").is_file():
        if config is not None and json.loads((target / MODEL_META).read_text()).get("config_id") != config:
            raise TargetError(f"--config {config}: {target} is the single model "
                              f"{json.loads((target / MODEL_META).read_text()).get('config_id')}")
        return target
    if (target / SPEC_FILE).is_file():
        return best_model_dir(target, config)
    raise TargetError(f"{target} is neither a sweep output folder (with {SPEC_FILE}) nor an exported model folder "
                      f"(with {MODEL_META} and model.pt)")


def image_files(args: list[Path]) -> tuple[list[Path], list[str]]:
    """Files to classify (folders walked, in sorted order; hidden files inside folders ignored) and problems."""
    files, problems = [], []
    for a in args:
        if a.is_dir():
            files += sorted(p for p in a.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(a).parts))
        elif a.is_file():
            files.append(a)
        else:
            problems.append(f"{a}: no such file or folder")
    return files, problems


def load_batch(paths: list[Path], meta: dict) -> tuple[list[Path], list, list[str]]:
    """Decode and preprocess as the evaluation did; returns readable paths, tensors and problems."""
    from covid_tune.data import IMAGE_EXTENSIONS, eval_transform, load_image

    norm = meta.get("normalization", {})
    transform = eval_transform(meta["image_size"], *([norm["mean"], norm["std"]] if norm else []))
    ok, tensors, problems = [], [], []
    for p in paths:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(f"{p}: skipped, not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)})")
            continue
        try:
            tensors.append(transform(load_image(str(p), meta["grayscale"])))
        except Exception as exc:  # PIL raises several types for broken files
            problems.append(f"{p}: skipped, cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        ok.append(p)
    return ok, tensors, problems


def predict_files(model_dir: Path, paths: list[Path], batch_size: int = 32, cam_dir: Path | None = None
                  ) -> tuple[list[dict], list[str]]:
    """One row per readable image (path, predicted, probability per class) and the problems met."""
    import torch

    from covid_tune import explain
    from covid_tune.engine import default_device
    from covid_tune.models import load_exported

    model, meta = load_exported(model_dir)
    device = default_device()
    model.to(device)
    classes, mode = meta["classes"], meta["label_mode"]
    rows, problems = [], []
    for start in range(0, len(paths), batch_size):
        ok, tensors, bad = load_batch(paths[start:start + batch_size], meta)
        problems += bad
        if not ok:
            continue
        images = torch.stack(tensors).to(device)
        with torch.no_grad():
            probs = explain.probabilities(model.eval()(images).float(), mode).cpu().numpy()
        pred = explain.decide(probs, mode, meta["threshold"])
        if cam_dir is not None:
            _write_cams(cam_dir, model, meta, ok, images, pred, probs, start)
        for p, pr, row in zip(ok, pred, probs):
            rows.append({"path": str(p), "predicted": explain.label_names(pr, classes),
                         **{c: float(v) for c, v in zip(classes, row)}})
    return rows, problems


def _write_cams(cam_dir: Path, model, meta: dict, paths: list[Path], images, pred, probs, start: int) -> None:
    from covid_tune import explain, figures

    cam_dir.mkdir(parents=True, exist_ok=True)
    maps = explain.grad_cam(model, meta["backbone"], images)
    for i, (p, m, pr, pb) in enumerate(zip(paths, maps, pred, probs)):
        crop = figures.display_crop(str(p), meta["image_size"], meta["grayscale"])
        top = int(pb.argmax())
        title = f"pred: {explain.label_names(pr, meta['classes'])}\n{meta['classes'][top]} {pb[top]:.3f}"
        figures.cam_tiles(cam_dir / f"{start + i:04d}_{p.stem}_gradcam.png", [crop], [m], [title],
                          f"{meta['config_id']}: Grad-CAM", ncols=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m covid_tune.predict",
        description="Classify images with a trained model: one line per image (path, predicted class, probability "
                    "per class). Exit 0: all images classified; 1: some file was skipped (named on stderr); "
                    "2: TARGET is not a sweep output folder or exported model.")
    parser.add_argument("target", type=Path, help="a sweep's output folder (uses REPORT.md's best configuration, "
                                                  "with seeds its seed that scored best on validation) or an "
                                                  "exported model folder (OUTPUT/best/<id>)")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders (walked recursively)")
    parser.add_argument("--config", help="with a sweep folder: the configuration to use (a config id of best/)")
    parser.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    parser.add_argument("--cam", type=Path, metavar="DIR", help="write a Grad-CAM overlay per image into DIR")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    args = parser.parse_args(argv)
    try:
        model_dir = resolve_target(args.target.resolve(), args.config)
    except (TargetError, OSError, ValueError) as exc:
        print(f"covid_tune.predict: {exc}", file=sys.stderr)
        return 2
    files, problems = image_files(args.images)
    rows, bad = predict_files(model_dir, files, args.batch_size, args.cam)
    problems += bad
    meta = json.loads((model_dir / MODEL_META).read_text())
    print(f"# model {meta['config_id']} ({model_dir})", file=sys.stderr)
    for r in rows:
        print("\t".join([r["path"], r["predicted"]] + [f"{c}={r[c]:.4f}" for c in meta["classes"]]))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "predicted", *meta["classes"]])
            writer.writeheader()
            writer.writerows(rows)
    for p in problems:
        print(f"covid_tune.predict: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
