"""A whole grid: the course's way vs covid_tune (grid_speedup, same_best_config)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from common import CPU, Sizes, log, quiet, split_sizes, subset

from covid_tune.data.dataset import DatasetIndex, scan_dataset
from covid_tune.data.loaders import SHUFFLE_STREAM, epoch_generator
from covid_tune.engine.training import TrainingRun

FREEZE_LEVELS = {"resnet18": ["fc_only", "layer1-3", "layer1", "none"],
                 "vgg16": ["fc_only", "conv1-3", "conv1-2", "none"],
                 "tiny_cnn": ["fc_only", "block1", "none"]}


def subset_tree(index: DatasetIndex, sizes: dict[str, int], dest: Path) -> Path:
    """An ImageFolder tree of symbolic links to :func:`subset` of ``index`` (labels after its class_map)."""
    sub = subset(index, sizes)
    for split, items in sub.splits.items():
        for i, (path, label) in enumerate(items):
            link = dest / split / sub.classes[label] / f"{i:05d}{Path(path).suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(Path(path).resolve())
    return dest


def grid_raw(root: Path, class_map: dict, s: Sizes, out: Path) -> dict:
    return {
        "name": "bench-grid", "output": str(out),
        "data": {"root": str(root), "class_map": class_map, "image_size": s.grid_size, "augment": False},
        "grid": {"backbone": list(s.grid_backbones), "freeze": {b: FREEZE_LEVELS[b] for b in s.grid_backbones},
                 "loss": "ce", "seed": 0, "lr": list(s.grid_lrs)},
        "trainer": {"epochs": s.grid_epochs, "optimizer": "sgd", "momentum": 0.9, "batch_size": 32,
                    "head_hidden": 64, "dropout": 0.3, "weights": "none"},
        "scheduler": {"metric": "val_loss", "grace_period": s.grid_grace, "reduction_factor": 2, "keep_checkpoints": 1},
        "resources": {"cpus": 1, "gpu": 0},
    }


class SeededOrder(torch.utils.data.Sampler):
    """A DataLoader sampler with :class:`covid_tune.data.loaders.TensorLoader`'s epoch order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch, SHUFFLE_STREAM)
        return iter(torch.randperm(self.n, generator=g).tolist())


def best_of(histories: dict[str, list[dict]]) -> tuple[str, int, float]:
    """(config id, epoch, val_loss) of the lowest validation loss over every configuration and epoch."""
    return min(((cid, h["epoch"], h["val_loss"]) for cid, rows in histories.items() for h in rows
                if h.get("val_loss") is not None), key=lambda t: (t[2], t[0], t[1]))


def bench_grid(root: Path, class_map: dict, s: Sizes, work: Path, cores: int, ray_start_s: float) -> dict:
    """The course's way vs covid_tune on the same grid."""
    from covid_tune.cli import run as run_mod
    from covid_tune.results import collect as results_mod
    from covid_tune.spec import plan as plan_mod
    from covid_tune.spec.load import validate
    from covid_tune.sweep import tuning

    if split_sizes(s.grid_train, s.grid_val):
        root, class_map = subset_tree(scan_dataset(root, class_map), split_sizes(s.grid_train, s.grid_val),
                                      work / "grid-data"), {}

    spec = validate(grid_raw(root, class_map, s, work / "grid"))
    plan = plan_mod.expand(spec)
    index = scan_dataset(root, class_map)
    torch.set_num_threads(cores)

    log(f"grid: the course's way, {len(plan)} configurations x {s.grid_epochs} epochs")
    course: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for cid, hp in plan.items():
        run = TrainingRun(replace(hp, feature_cache="off"), index, CPU)  # PIL DataLoader, every epoch
        # the batches in covid_tune's order (same seed, same epoch): the two sides then differ only in
        # how they compute, not in which images each step sees
        sampler = SeededOrder(len(run.train_loader.dataset), hp.seed)
        run.train_loader = torch.utils.data.DataLoader(run.train_loader.dataset, batch_size=hp.batch_size,
                                                       sampler=sampler, num_workers=hp.num_workers)
        course[cid] = []
        while run.epoch < hp.epochs:
            sampler.set_epoch(run.epoch)
            course[cid].append(run.run_epoch())
    course_s = time.perf_counter() - start

    log(f"grid: covid_tune (ASHA, caches, {cores} trials at once)")
    start = time.perf_counter()
    decoded = run_mod.prepare_cache(spec, index)  # what run.py's prepare() does
    cache_s = time.perf_counter() - start
    with quiet(work / "ray.log"):
        trials = tuning.run_sweep(spec, plan, index, decoded)
    ours_s = time.perf_counter() - start + ray_start_s
    records = results_mod.collect(spec.experiment_dir)
    ours = {cid: rec.history for cid, rec in records.items()}
    failed = [c for c, t in trials.items() if t["status"] != "ok"]
    b_course, b_ours = best_of(course), best_of(ours)
    rows = {}
    for cid in plan:
        rows[cid] = {"course_epochs": len(course[cid]), "course_best_val_loss": min(h["val_loss"] for h in course[cid]),
                     "covid_tune_epochs": len(ours.get(cid, [])),
                     "covid_tune_best_val_loss": min((h["val_loss"] for h in ours.get(cid, [])), default=None),
                     "feature_cache": any(h.get("feature_cache") for h in ours.get(cid, []))}
    return {"configurations": len(plan), "epochs": s.grid_epochs, "image_size": s.grid_size,
            "train_images": len(index.paths("train")), "val_images": len(index.paths("validation")),
            "course_s": course_s, "covid_tune_s": ours_s, "covid_tune_ray_start_s": ray_start_s,
            "covid_tune_cache_build_s": cache_s, "course_epochs_trained": sum(len(v) for v in course.values()),
            "covid_tune_epochs_trained": sum(len(v) for v in ours.values()), "failed_trials": failed,
            "course_best": {"config": b_course[0], "epoch": b_course[1], "val_loss": b_course[2]},
            "covid_tune_best": {"config": b_ours[0], "epoch": b_ours[1], "val_loss": b_ours[2]},
            "grid_speedup": course_s / ours_s, "same_best_config": b_course[0] == b_ours[0], "rows": rows}


# --- 5. GPU ----------------------------------------------------------------------------------------------
