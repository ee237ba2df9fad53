"""Run a trained model on new images: ``covid-tune predict TARGET IMAGE_OR_FOLDER...``.

TARGET is a sweep's output folder (its best configuration by the sweep's metric, or ``--config``) or
one exported model folder (``OUTPUT/best/<config_id>``). Images are preprocessed exactly as the test
evaluation did, from ``model.json``. No Ray, and heavy imports only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from covid_tune.cli.main import setup_logging, verbosity_options
from covid_tune.cli.output_dir import nearest_existing, not_writable
from covid_tune.engine.files import MODEL_META, RESULTS_FILE, SPEC_FILE, is_model_folder

log = logging.getLogger(__name__)



class TargetError(ValueError):
    """TARGET is neither a sweep output folder nor an exported model folder, or its model cannot be used."""


# what load_exported and load_batch read from model.json; "normalization" is optional (older exports)
META_KEYS = ("backbone", "classes", "config_id", "dropout", "freeze", "grayscale", "head_hidden", "image_size",
             "label_mode", "threshold")


def _read_json(path: Path) -> object:
    """A JSON file's content; a missing, unreadable or malformed file is a TargetError naming it."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise TargetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TargetError(f"{path}: not valid JSON ({exc})") from None


def read_meta(model_dir: Path) -> dict:
    """``model.json`` of an exported model, checked for what rebuilding and preprocessing need."""
    from covid_tune.models.registry import backbone_names

    path = model_dir / MODEL_META
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise TargetError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise TargetError(f"{path}: missing key(s) {', '.join(missing)} (not a model.json that covid_tune wrote)")
    if meta["backbone"] not in backbone_names():
        raise TargetError(f"{path}: unknown backbone {meta['backbone']!r} (known: {', '.join(backbone_names())})")
    if not isinstance(meta["classes"], list) or len(meta["classes"]) < 2:
        raise TargetError(f"{path}: classes must be a list of at least two names, found {meta['classes']!r}")
    return meta


def load_model(model_dir: Path):
    """The exported model and its checked ``model.json``; any unreadable or mismatched file is a TargetError."""
    from covid_tune.models.registry import ExportedModelError, load_exported

    meta = read_meta(model_dir)
    try:
        return load_exported(model_dir, meta)  # a single model, or an ensemble (best/<group>/ensemble/)
    except ExportedModelError as exc:
        raise TargetError(str(exc)) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise TargetError(f"{model_dir / MODEL_META}: cannot rebuild the model ({exc})") from None


def best_model_dir(sweep: Path, config: str | None = None) -> Path:
    """The exported model of ``config``, or the report's best configuration's ensemble where one was built
    (``best/<group>/ensemble/``, ``report.ensemble``), else the model of the report's best configuration
    (``best_group`` in
    ``report/results.json``: the best mean over its seeds on validation) and, among its seeds, the one whose
    best epoch scored best on the sweep's selection metric (the value each ``model.json`` records; ties:
    plan order, as results.best_epoch does for epochs). Without a report: the best of all exported models."""
    from covid_tune.spec.load import SpecError, validate

    try:
        spec = validate(_read_json(sweep / SPEC_FILE))
    except SpecError as exc:
        raise TargetError(f"{sweep / SPEC_FILE}: not a valid sweep spec: {exc}") from None
    metas = {f.parent.name: _read_json(f) for f in sorted((sweep / "best").glob(f"*/{MODEL_META}"))}
    bad = [c for c, m in metas.items() if not isinstance(m, dict)]
    if bad:
        raise TargetError(f"{sweep / 'best' / bad[0] / MODEL_META}: expected a JSON object")
    if not metas:
        raise TargetError(f"{sweep} is a sweep output folder but holds no exported model (best/*/{MODEL_META}); "
                          f"run `covid-tune report {sweep}` first")
    if config is not None:
        if config not in metas:
            raise TargetError(f"--config {config}: no exported model; choose one of: {', '.join(metas)}")
        return sweep / "best" / config
    from covid_tune.results.selection import best_of
    from covid_tune.spec import plan as plan_mod

    metric, order = spec.scheduler.metric, list(plan_mod.expand(spec))
    scored = sorted((c for c in metas if metas[c].get("metrics", {}).get(metric) is not None),
                    key=lambda c: order.index(c) if c in order else len(order))  # equals: the earlier in the plan
    chosen = set(_best_group_ids(sweep)) & set(scored)
    best = best_of([c for c in scored if c in chosen] if chosen else scored,
                   lambda c: metas[c]["metrics"][metric], spec.scheduler.mode)
    if best is None:
        raise TargetError(f"{sweep}: no exported model records {metric}")
    ensemble = _best_ensemble(sweep)
    return ensemble if ensemble is not None else sweep / "best" / best


def _best_ensemble(sweep: Path) -> Path | None:
    """The report's best configuration's ensemble folder (``best/<group>/ensemble/``), if it was built."""
    try:
        best = json.loads((sweep / RESULTS_FILE).read_text()).get("best_group")
    except (OSError, ValueError, AttributeError):
        return None
    folder = sweep / "best" / str(best) / "ensemble"
    return folder if best and is_model_folder(folder) else None


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
    if is_model_folder(target):
        if config is not None and (found := read_meta(target)["config_id"]) != config:
            raise TargetError(f"--config {config}: {target} is the single model {found}")
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
    from covid_tune.data.dataset import IMAGE_EXTENSIONS, eval_transform, load_image

    norm = meta.get("normalization", {})
    transform = eval_transform(meta["image_size"], *([norm["mean"], norm["std"]] if norm else []))
    ok, tensors, problems = [], [], []
    for p in paths:
        if not is_image_file(p):  # DICOM files often have no extension
            problems.append(f"{p}: skipped, not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)}, "
                            "or DICOM without an extension)")
            continue
        try:
            tensors.append(transform(load_image(str(p), meta["grayscale"])))
        except Exception as exc:  # PIL raises several types for broken files
            problems.append(f"{p}: skipped, cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        ok.append(p)
    return ok, tensors, problems


def predict_files(model_dir: Path, paths: list[Path], batch_size: int = 32, cam_dir: Path | None = None,
                  loaded: tuple | None = None) -> tuple[list[dict], list[str]]:
    """One row per readable image (path, predicted, probability per class) and the problems met.

    ``loaded``: the ``(model, meta)`` of :func:`load_model` when the caller has it already."""
    import torch

    from covid_tune.engine import explain
    from covid_tune.engine.training import default_device

    model, meta = loaded if loaded is not None else load_model(model_dir)
    device = default_device()
    model.to(device)
    classes, mode = meta["classes"], meta["label_mode"]
    temperature = meta.get("temperature", 1.0)  # fitted on validation by the sweep (older exports: none)
    rows, problems = [], []
    for start in range(0, len(paths), batch_size):
        ok, tensors, bad = load_batch(paths[start:start + batch_size], meta)
        problems += bad
        if not ok:
            continue
        images = torch.stack(tensors).to(device)
        with torch.no_grad():
            logits = model.eval()(images).float()
            probs = explain.probabilities(logits / torch.as_tensor(temperature, device=device), mode).cpu().numpy()
        pred = decide(probs, meta)
        if cam_dir is not None:
            _write_cams(cam_dir, model, meta, ok, images, pred, probs, start)
        for p, pr, row in zip(ok, pred, probs):
            rows.append({"path": str(p), "predicted": explain.label_names(pr, classes),
                         **{c: float(v) for c, v in zip(classes, row)}})
    return rows, problems


def decide(probs, meta: dict):
    """Decisions from calibrated probabilities: at ``model.json``'s operating point (single-label: the
    positive class when its probability reaches the threshold, else the most probable other class;
    multi-label: each class at its own threshold); without one, argmax or ``threshold`` as the evaluation."""
    import numpy as np

    from covid_tune.engine import explain

    op, classes = meta.get("operating_point"), meta["classes"]
    if not op:
        return explain.decide(probs, meta["label_mode"], meta["threshold"])
    if meta["label_mode"] == "multi":
        return (probs >= np.asarray(op["threshold"])).astype(np.int64)
    k = classes.index(op["positive"])
    others = probs.copy()
    others[:, k] = -1.0
    return np.where(probs[:, k] >= op["threshold"], k, others.argmax(1))


def _write_cams(cam_dir: Path, model, meta: dict, paths: list[Path], images, pred, probs, start: int) -> None:
    from covid_tune.engine import explain
    from covid_tune.report import figures

    cam_dir.mkdir(parents=True, exist_ok=True)
    maps = explain.grad_cam(model, meta["backbone"], images)
    for i, (p, m, pr, pb) in enumerate(zip(paths, maps, pred, probs)):
        crop = figures.display_crop(str(p), meta["image_size"], meta["grayscale"])
        top = int(pb.argmax())
        title = f"pred: {explain.label_names(pr, meta['classes'])}\n{meta['classes'][top]} {pb[top]:.3f}"
        figures.cam_tiles(cam_dir / f"{start + i:04d}_{p.stem}_gradcam.png", [crop], [m], [title],
                          f"{meta['config_id']}: Grad-CAM", ncols=1)


def operating_line(meta: dict) -> str:
    """How the printed probabilities and decisions come about, in one line."""
    t, op = meta.get("temperature"), meta.get("operating_point")
    if not op:
        return "no operating point in model.json: probabilities as the network gives them, decision by " + (
            "the most probable class" if meta["label_mode"] == "single" else f"probability >= {meta['threshold']}")
    temp = ", ".join(f"{v:.3g}" for v in t) if isinstance(t, list) else f"{t:.3g}"
    if meta["label_mode"] == "multi":
        cut = ", ".join(f"{c} >= {v:.4f}" for c, v in zip(meta["classes"], op["threshold"]))
    else:
        cut = f"{op['positive']} when its probability >= {op['threshold']:.4f}, else the most probable other class"
    return f"temperature {temp} (fitted on validation); decision ({op['rule']}, chosen on validation): {cut}"


def is_image_file(path: Path) -> bool:
    """An image by its extension, or a DICOM file without one (found by its preamble, as the data scan does)."""
    from covid_tune.data.dataset import IMAGE_EXTENSIONS
    from covid_tune.data.dicom import is_dicom

    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(path)


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--batch-size``, ``--csv`` or ``--cam``, checked before any work; None if nothing."""
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be at least 1"
    if args.csv is not None:
        problem = _unwritable_file(args.csv)
        if problem:
            return f"--csv {args.csv}: {problem}"
    if args.cam is not None:
        cam = nearest_existing(args.cam)
        if not cam.is_dir():
            return f"--cam {args.cam}: {cam} is not a folder"
        why = not_writable(cam)
        if why:
            return f"--cam {args.cam}: folder {cam} is not writable ({why})"
    return None


def _unwritable_file(path: Path) -> str | None:
    if path.is_dir():
        return "is a folder, expected a file name"
    parent = path.parent
    if not parent.is_dir():
        return f"folder {parent} does not exist" if not parent.exists() else f"{parent} is not a folder"
    if path.exists() and not os.access(path, os.W_OK):
        return "file is not writable"
    why = not_writable(parent)
    return f"folder {parent} is not writable ({why})" if why else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="covid-tune predict",
        description="Classify images with a trained model: one line per image (path, predicted class, probability "
                    "per class). Exit 0: all images classified; 1: some file was skipped (named on stderr) or no "
                    "image was found; 2: TARGET is not a sweep output folder or a usable exported model, or an "
                    "option is wrong (nothing classified).")
    parser.add_argument("target", type=Path, help="a sweep's output folder (uses REPORT.md's best configuration, "
                                                  "with seeds its seed that scored best on validation) or an "
                                                  "exported model folder (OUTPUT/best/<id>)")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders (walked recursively)")
    parser.add_argument("--config", help="with a sweep folder: the configuration to use (a config id of best/)")
    parser.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    parser.add_argument("--cam", type=Path, metavar="DIR", help="write a Grad-CAM overlay per image into DIR")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    verbosity_options(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    problem = argument_problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    try:
        model_dir = resolve_target(args.target.resolve(), args.config)
        model, meta = load_model(model_dir)
    except (TargetError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    files, problems = image_files(args.images)
    if not any(is_image_file(f) for f in files):
        from covid_tune.data.dataset import IMAGE_EXTENSIONS

        others = f"; {len(files)} other file(s) there, none an image" if files else ""
        for p in problems:
            log.error("%s", p)
        log.error(f"no images found in {', '.join(map(str, args.images))} (folders walked "
              f"recursively, hidden files ignored; image extensions: {', '.join(IMAGE_EXTENSIONS)}){others}")
        return 1
    rows, bad = predict_files(model_dir, files, args.batch_size, args.cam, loaded=(model, meta))
    problems += bad
    log.info(f"model {meta['config_id']} ({model_dir})")
    log.info(operating_line(meta))
    for r in rows:
        print("\t".join([r["path"], r["predicted"]] + [f"{c}={r[c]:.4f}" for c in meta["classes"]]))
    if args.csv:
        try:
            with args.csv.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["path", "predicted", *meta["classes"]])
                writer.writeheader()
                writer.writerows(rows)
        except OSError as exc:  # checked before the work; a disk that filled up since still ends here
            problems.append(f"--csv {args.csv}: not written ({exc.strerror or exc})")
    for p in problems:
        log.error("%s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
