"""Export a trained model for deployment: ``covid-tune export TARGET --format onnx|torchscript [--out DIR]``.

TARGET is what ``covid-tune predict`` takes (a sweep's output folder: its chosen model, or ``--config``;
or one exported model folder), resolved by :func:`covid_tune.cli.predict.resolve_target`. The exported
graph takes preprocessed images (N x 3 x size x size, float32, normalized) and returns class
probabilities (softmax, or a sigmoid per class for multi-label), made by ``torch.onnx.export``
(its ``torch.export`` path) or ``torch.jit.trace``; beside it a JSON says how to preprocess and read
it. A parity check runs the exported file (onnxruntime, or torch for TorchScript) against the PyTorch
model on a few images and prints the largest difference of probabilities.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

from covid_tune.cli.main import setup_logging, verbosity_options
from covid_tune.cli.predict import TargetError, load_batch, load_model, resolve_target
from covid_tune.engine.files import EVAL_FILE

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
EXTRA = {"onnx": ("onnx", "onnxscript", "onnxruntime")}  # torch.onnx's exporter needs onnxscript
OPSET = 18
PARITY_TOL = 1e-4  # largest allowed |p_exported - p_torch| over the check images
PARITY_IMAGES = 8


def missing_packages(fmt: str) -> list[str]:
    """The packages of the ``export`` extra that ``fmt`` needs and this Python lacks."""
    return [p for p in EXTRA.get(fmt, ()) if importlib.util.find_spec(p) is None]


def probability_model(model, label_mode: str):
    """``model`` with its output turned into probabilities as the evaluation does (softmax or sigmoid)."""
    import torch

    from covid_tune.engine import explain

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return explain.probabilities(self.model(images), label_mode)

    return Probabilities().eval()


def parity_inputs(model_dir: Path, meta: dict, images: list[Path] | None):
    """A batch to compare on and where it came from: ``images`` given, else the first test images named
    in the model's eval.json, else seeded random inputs of the right shape."""
    import torch

    paths = list(images or [])
    source = "the given images"
    if not paths and (model_dir / EVAL_FILE).is_file():
        try:
            files = json.loads((model_dir / EVAL_FILE).read_text())["splits"]["test"]["files"]
            paths, source = [Path(f) for f in files if Path(f).is_file()], "test images from eval.json"
        except (OSError, ValueError, KeyError, TypeError):
            paths = []
    if paths:
        ok, tensors, _ = load_batch(paths[:PARITY_IMAGES], meta)
        if tensors:
            return torch.stack(tensors), f"{len(ok)} {source}"
    size = meta["image_size"]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, size, size, generator=generator), "4 random inputs (no test images found)"


def export_onnx(wrapped, example, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(path), input_names=["image"], output_names=["probabilities"],
                          dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False,
                          external_data=False)


def run_onnx(path: Path, images) -> object:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.numpy()})[0]


def export_torchscript(wrapped, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():  # torch.jit.trace is deprecated in favour of torch.export, still supported
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, example)
    traced.save(str(path))


def run_torchscript(path: Path, images) -> object:
    import torch

    with warnings.catch_warnings():  # torch.jit.load: deprecated like trace, still supported
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(images).numpy()


def describe(meta: dict, fmt: str, file: str, parity: dict) -> dict:
    """The JSON beside the exported file: preprocessing, classes, decision settings, shapes."""
    import torch

    from covid_tune.models.registry import IMAGENET_MEAN, IMAGENET_STD

    size = meta["image_size"]
    norm = meta.get("normalization") or {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    out = {
        "format": fmt, "file": file, "config_id": meta["config_id"], "backbone": meta["backbone"],
        "epoch": meta.get("epoch"), "torch": torch.__version__,
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "probabilities", "shape": ["batch", len(meta["classes"])],
                   "activation": "softmax" if meta["label_mode"] == "single" else "sigmoid"},
        "preprocessing": {
            "resize": round(size * 256 / 224), "resize_note": "shorter side to this many pixels, bilinear",
            "center_crop": size, "grayscale": meta["grayscale"],
            "channels": "3 (a grayscale image repeated on each)" if meta["grayscale"] else "3 (RGB)",
            "scale": "pixel / 255", "mean": norm["mean"], "std": norm["std"]},
        "classes": meta["classes"], "label_mode": meta["label_mode"],
        "decision": "argmax" if meta["label_mode"] == "single" else "probability >= threshold, per class",
        "parity": parity,
    }
    for key in ("threshold", "temperature"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    if fmt == "onnx":
        out["opset"] = OPSET
    return out


def export_model(model_dir: Path, fmt: str, out_dir: Path, images: list[Path] | None = None) -> dict:
    """Write the exported file and its JSON into ``out_dir``; returns the JSON (with the parity check)."""
    import numpy as np
    import torch

    model, meta = load_model(model_dir)
    wrapped = probability_model(model, meta["label_mode"])
    batch, source = parity_inputs(model_dir, meta, images)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    example = batch[:2] if len(batch) >= 2 else torch.cat([batch, batch])
    (export_onnx if fmt == "onnx" else export_torchscript)(wrapped, example, path)
    with torch.no_grad():
        want = wrapped(batch).numpy()
    got = (run_onnx if fmt == "onnx" else run_torchscript)(path, batch)
    diff = float(np.abs(np.asarray(got) - want).max())
    parity = {"images": source, "max_abs_diff": diff, "tolerance": PARITY_TOL,
              "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit"}
    info = describe(meta, fmt, path.name, parity)
    (out_dir / f"{path.name}.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="covid-tune export",
        description="Export a trained model as ONNX or TorchScript, with a JSON of its preprocessing, classes and "
                    "shapes, and check that it gives the PyTorch model's probabilities. Exit 0: written and the "
                    f"parity check passed (max |difference| <= {PARITY_TOL:g}); 1: written but the check failed; "
                    "2: TARGET, an option or the export extra is wrong or missing (nothing written).")
    parser.add_argument("target", type=Path, help="a sweep's output folder (its chosen model) or an exported model "
                                                  "folder (OUTPUT/best/<id>), as for predict")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx (needs the export extra: "
                        "pip install 'covid_tune[export]') or torchscript")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: MODEL_FOLDER/export)")
    parser.add_argument("--config", help="with a sweep folder: the configuration to export (a config id of best/)")
    parser.add_argument("--images", type=Path, nargs="+", metavar="IMAGE",
                        help=f"images for the parity check (default: the first {PARITY_IMAGES} test images "
                             "named in the model's eval.json)")
    verbosity_options(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    missing = missing_packages(args.format)
    if missing:
        log.error(f"--format {args.format} needs the export extra: pip install 'covid_tune[export]' "
                  f"(missing: {', '.join(missing)})")
        return 2
    try:
        model_dir = resolve_target(args.target.resolve(), args.config)
        load_model(model_dir)  # its problems are the user's: one message, exit 2
    except (TargetError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    out_dir = args.out if args.out is not None else model_dir / "export"
    if out_dir.exists() and not out_dir.is_dir():
        log.error(f"--out {out_dir}: a file is in the way (give a folder)")
        return 2
    info = export_model(model_dir, args.format, out_dir, args.images)
    parity = info["parity"]
    print(f"{out_dir / info['file']}: {args.format}, input {info['input']['shape']}, {len(info['classes'])} classes; "
          f"parity on {parity['images']}: max |p - p_torch| = {parity['max_abs_diff']:.2e}")
    if parity["max_abs_diff"] > PARITY_TOL:
        log.error(f"parity check failed: max |difference| {parity['max_abs_diff']:.2e} > {PARITY_TOL:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
