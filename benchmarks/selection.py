#!/usr/bin/env python
"""Which best-epoch rule holds up on real data: measured on ../shared/cxr-real.

    python benchmarks/selection.py [--seeds 0 1 2] [--epochs 12] [--augment on off] [--freeze none layer1]
                                   [--lr-schedule constant cosine] [--resplits K] [--json FILE]
                                   [--lr 1e-3] [--batch-size 32] [--weight-decay 0] [--image-size 64]

Trains resnet18 from scratch (Adam, 64 px, the issue's strong baseline) once per seed and setting
(augmentation x freeze level x lr schedule), without Ray, evaluating the test split after every epoch
(for the measurement only: a sweep never looks at test before it has chosen). Then scores each
selection rule by the test accuracy of the epoch it picks: argmax val_acc (earliest on ties), argmin
val_loss, argmax of an EMA of val_acc, argmax of a centred 3-epoch mean of val_acc, the last epoch,
and the weight average of the 3 best val_acc epochs' models. Prints one line per run and, per setting,
the mean/std of each rule over its runs, how much validation accuracy moves per epoch over the second
half of training (mean |change|: what makes a pick noisy), and the test accuracy of the seeds' ensemble
(their class probabilities averaged) at the epochs the EMA rule picks.

With ``--resplits K`` every run is repeated on K other splits of the same 1,018 images, grouped by
patient (``manifest.csv``'s ``patient_group``; no patient crosses splits) and stratified by class:
covid_tune/data/folds.py (the sweep's seeded ``StratifiedGroupKFold``) cuts the pool into 6 folds; split
k tests on fold k, validates on fold k+1 and trains on the other four (about 680 / 170 / 170 images).
None of these splits was used while the shipped sweep was designed (each test fold shares 16-32 images
with the dataset's own test split, but trains on other images), so they give a fairer estimate of a
recipe than the own split.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from covid_tune.data.cache import build_decoded_cache  # noqa: E402
from covid_tune.data.dataset import DatasetIndex, encode_targets, scan_dataset  # noqa: E402
from covid_tune.data.folds import FoldError, assign_folds, image_groups  # noqa: E402
from covid_tune.data.loaders import TensorLoader  # noqa: E402
from covid_tune.engine import training as engine
from covid_tune.results.selection import pick_epoch  # noqa: E402

# name -> (metric, mode, smoothing rule)
RULES = {"val_acc": ("val_acc", "max", "best"), "val_loss": ("val_loss", "min", "best"),
         "val_acc_ema": ("val_acc", "max", "ema"), "val_acc_mean3": ("val_acc", "max", "mean3"),
         "val_loss_ema": ("val_loss", "min", "ema"), "val_loss_mean3": ("val_loss", "min", "mean3")}

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "cxr-real"
FOLDS = 6


def resplit(index: DatasetIndex, k: int) -> DatasetIndex:
    """``index`` with its images pooled and cut again by patient (``ROOT/manifest.csv``'s
    ``patient_group``): test fold k, validation fold k+1, train the rest. The grouping and the seeded
    ``StratifiedGroupKFold`` are the sweep's own (``covid_tune/data/folds.py``)."""
    names = tuple(index.splits)
    pool = [item for s in names for item in index.splits[s]]
    try:
        by_split = image_groups(index, "patient_group", names)
    except FoldError as e:
        raise SystemExit(f"--resplits needs {index.root / 'manifest.csv'} with a patient_group column: {e}") from None
    groups = [g for s in names for g in by_split[s]]
    # stratify on the original class (covid / pneumonia / normal), finer than the mapped labels
    strata = [Path(path).parent.name for path, _ in pool]
    fold_of = assign_folds(strata, groups, FOLDS, seed=0)
    test, val = np.flatnonzero(fold_of == k % FOLDS), np.flatnonzero(fold_of == (k + 1) % FOLDS)
    held_out = set(test.tolist()) | set(val.tolist())
    splits = {"train": [pool[i] for i in range(len(pool)) if i not in held_out],
              "validation": [pool[i] for i in val], "test": [pool[i] for i in test]}
    return DatasetIndex(index.root, index.classes, splits, index.original_classes)


def _test_acc(run: engine.TrainingRun, loader) -> float:
    res = engine.evaluate(run.model, loader, run.loss_fn, run.device, "single", 0.5, len(run.classes))
    return res.metrics["acc"]


def _test_probs(run: engine.TrainingRun, loader) -> np.ndarray:
    run.model.eval()
    with torch.no_grad():
        return np.concatenate([torch.softmax(run.model(x).float(), 1).numpy() for x, _ in loader])


def one_run(index, decoded, seed: int, epochs: int, augment: bool, lr: float, freeze: str = "none",
            lr_schedule: str = "constant", split: str = "own", batch_size: int = 32, weight_decay: float = 0.0) -> dict:
    hp = engine.HParams(backbone="resnet18", freeze=freeze, loss="ce", seed=seed, epochs=epochs, optimizer="adam",
                        lr=lr, lr_schedule=lr_schedule, batch_size=batch_size, weight_decay=weight_decay,
                        head_hidden=0, dropout=0.0, image_size=decoded.image_size, augment=augment)
    run = engine.TrainingRun(hp, index, torch.device("cpu"), decoded=decoded)
    targets = encode_targets(index.labels("test"), index.classes, "single", {})
    test_loader = TensorLoader(decoded["test"], targets, decoded.image_size, 64)
    history, states, probs = [], {}, {}
    t0 = time.perf_counter()
    for _ in range(epochs):
        m = run.run_epoch()
        m["test_acc"] = _test_acc(run, test_loader)
        history.append(m)
        states[m["epoch"]] = copy.deepcopy(run.model.state_dict())
        probs[m["epoch"]] = _test_probs(run, test_loader)
    picks = {name: pick_epoch(history, *rule) for name, rule in RULES.items()}
    picks["last"] = epochs
    late = [h["val_acc"] for h in history[epochs // 2:]]  # the second half, where the pick usually falls
    swing = float(np.abs(np.diff(late)).mean()) if len(late) > 1 else None
    out = {"split": split, "seed": seed, "augment": augment, "freeze": freeze, "lr_schedule": lr_schedule,
           "seconds": time.perf_counter() - t0, "val_swing": swing,
           "ema_probs": probs[picks["val_acc_ema"]].tolist(), "test_targets": targets.tolist(),
           "history": [{k: h[k] for k in ("epoch", "val_acc", "val_loss", "test_acc")} for h in history],
           "test_acc": {rule: history[e - 1]["test_acc"] for rule, e in picks.items()},
           "epoch": picks}
    top3 = sorted(history, key=lambda h: (-h["val_acc"], h["epoch"]))[:3]
    avg = {k: sum(states[h["epoch"]][k].float() for h in top3) / 3 for k in states[top3[0]["epoch"]]}
    model_state = {k: v.to(states[top3[0]["epoch"]][k].dtype) for k, v in avg.items()}
    run.model.load_state_dict(model_state)
    out["test_acc"]["avg_top3_weights"] = _test_acc(run, test_loader)
    out["test_acc"]["oracle"] = max(h["test_acc"] for h in history)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam's L2 penalty")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--augment", nargs="+", default=["on"], choices=["on", "off"])
    p.add_argument("--freeze", nargs="+", default=["none"], choices=["none", "layer1", "layer1-3", "fc_only"])
    p.add_argument("--lr-schedule", nargs="+", default=["constant"], choices=list(engine.LR_SCHEDULES))
    p.add_argument("--resplits", type=int, default=0, metavar="K",
                   help=f"run on K patient-grouped resplits (1..{FOLDS}) instead of the dataset's own split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if not 0 <= args.resplits <= FOLDS:
        p.error(f"--resplits must be 0..{FOLDS}, got {args.resplits}")
    index = scan_dataset(args.data, {"covid": "infected", "pneumonia": "infected"})
    cuts = [("own", index)] if not args.resplits else \
        [(f"resplit{k}", resplit(index, k)) for k in range(args.resplits)]
    settings = list(itertools.product(args.augment, args.freeze, args.lr_schedule))
    runs = []
    for split, idx in cuts:
        decoded = build_decoded_cache(idx, args.image_size, splits=("train", "validation", "test"))
        for (aug, freeze, schedule), seed in itertools.product(settings, args.seeds):
            r = one_run(idx, decoded, seed, args.epochs, aug == "on", args.lr, freeze, schedule, split,
                        args.batch_size, args.weight_decay)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("split", "seed", "augment", "freeze", "lr_schedule", "seconds",
                                                 "epoch", "test_acc")}), flush=True)
            print("  val_acc ", " ".join(f"{h['val_acc']:.3f}" for h in r["history"]), flush=True)
            print("  test_acc", " ".join(f"{h['test_acc']:.3f}" for h in r["history"]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(runs, indent=1))
    for aug, freeze, schedule in settings:
        sub = [r for r in runs if (r["augment"], r["freeze"], r["lr_schedule"]) == (aug == "on", freeze, schedule)]
        print(f"augment {aug}, freeze {freeze}, lr_schedule {schedule}: {len(sub)} runs, "
              "test accuracy of the picked epoch, mean ± std")
        for rule in sub[0]["test_acc"]:
            vals = np.array([r["test_acc"][rule] for r in sub])
            print(f"  {rule:18s} {vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.3f}  "
                  + " ".join(f"{v:.3f}" for v in vals))
        swings = [r["val_swing"] for r in sub if r["val_swing"] is not None]
        ensembles = []
        for split, _ in cuts:  # one seed ensemble per split: the seeds share its test images
            same = [r for r in sub if r["split"] == split]
            votes = np.mean([r["ema_probs"] for r in same], axis=0).argmax(1)
            ensembles.append(float((votes == np.array(same[0]["test_targets"])).mean()))
        print(f"  val_acc moves {np.mean(swings) if swings else float('nan'):.3f} per epoch (second half); "
              f"seed ensemble at the EMA picks: test " + " ".join(f"{e:.3f}" for e in ensembles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
