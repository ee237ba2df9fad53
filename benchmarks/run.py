#!/usr/bin/env python
"""covid_tune's speed, measured side by side in one run on one machine.

    python benchmarks/run.py [--quick] [--json FILE] [--data DIR]

Each line compares the plain way and covid_tune's way on the same data, in the same process
(or the same Ray session), one right after the other: timings on a shared machine swing between
runs, ratios taken minutes apart would not mean much.

  head_cache_speedup  head-only (fc_only) epoch: plain path (images through the frozen trunk every
                      epoch) vs training the head on features computed once (steady-state epoch;
                      the one-off extraction is reported beside it)
  loader_speedup      training input pipeline, images/s: PIL ImageFolder DataLoader with the course's
                      augmentation (the faster of 0 and N worker processes) vs the decoded cache with
                      tensor augmentation (the one-off cache build is reported beside it)
  tune_overhead       one trial inside Ray Tune (Tuner.fit wall time, Ray already started: actor start,
                      object store, per-epoch report + checkpoint) vs the same training called directly;
                      a fraction of the direct time
  grid_speedup        a whole grid: the course's way (every configuration for every epoch, one after
                      another, PIL pipeline, all cores) vs covid_tune (ASHA, decoded + feature caches,
                      one trial per core; Ray start-up and cache build included); same_best_config:
                      whether both pick the same configuration (lowest validation loss of any epoch)
  checkpoint_kb       one fc_only resnet18 checkpoint (after an epoch: weights + momentum), what a trial
                      saves (trained part only) beside the whole model's state as it was saved before
  outside_trials      sweeps/demo.yaml end to end (a subprocess, its own local Ray): the fraction of the
                      wall clock outside Tune's trials, with every phase's seconds (results.json timing)
  gpu_mfu             on a GPU only: training images/s per backbone at 224 px (bf16 autocast,
                      channels_last, data on the GPU) and FLOPs/image x images/s / peak bf16 FLOP/s;
                      beside it the course's way on the same GPU (PIL DataLoader workers, float32)

Data: the real chest X-rays in ../shared/cxr-real when present (covid + pneumonia -> infected),
else a generated synthetic set. ``--quick`` keeps every part small enough to finish in under five
minutes on two CPU cores.
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that wait sleep instead of spinning. On a machine shared with
# other jobs, a spinning two-thread process stalls whenever one core is taken (steps 10x slower);
# passive waiting costs an idle machine up to ~15% on two threads. Both sides run under it (Ray's
# workers inherit it). Set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from covid_tune import cache as cache_mod
from covid_tune import engine
from covid_tune.data import DatasetIndex, make_synthetic, scan_dataset
from covid_tune.engine import HParams, TrainingRun
from covid_tune.loaders import SHUFFLE_STREAM, TensorLoader, epoch_generator

REPO = Path(__file__).resolve().parents[1]
CXR_REAL = (REPO / ".." / "shared" / "cxr-real").resolve()
CLASS_MAP = {"covid": "infected", "pneumonia": "infected"}
CPU = torch.device("cpu")

TARGETS = {"head_cache_speedup": (">=", 20.0), "loader_speedup": (">=", 5.0), "tune_overhead": ("<=", 0.03),
           "grid_speedup": (">=", 3.0), "same_best_config": ("==", True), "checkpoint_kb": ("<=", 1024.0),
           "outside_trials": ("<=", 0.25)}

# dense bf16 tensor-core peak, FLOP/s (vendor datasheets); COVID_TUNE_PEAK_FLOPS overrides
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
             "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


@dataclass(frozen=True)
class Sizes:
    """How big each part is."""

    loader_images: int = 685
    loader_size: int = 224
    loader_batch: int = 32
    large_images: int = 96
    head_backbones: tuple[str, ...] = ("resnet18", "vgg16")
    head_train: int = 128
    head_val: int = 32
    head_size: int = 224
    overhead_backbone: str = "resnet18"
    overhead_freeze: str = "layer1"
    overhead_size: int = 96
    overhead_epochs: int = 4
    overhead_train: int | None = 342  # images per split for the one trial (None: all)
    overhead_val: int | None = 90
    grid_size: int = 64
    grid_epochs: int = 8
    grid_lrs: tuple[float, ...] = (0.01, 0.001)
    grid_backbones: tuple[str, ...] = ("resnet18",)
    # ASHA's grace period: from-scratch, all-trainable configurations lead only after a few epochs
    # (part1.yaml gives 4 of 24)
    grid_grace: int = 4
    grid_train: int | None = None  # images per split for the grid (None: all)
    grid_val: int | None = None
    gpu_batch: int = 128
    gpu_steps: int = 30
    rounds: int = 2  # repeats of the side-by-side measurements (fastest kept)


FULL = Sizes()
# a smoke run of every part: too small for ASHA to prune much or for per-trial costs to vanish
QUICK = Sizes(loader_images=256, large_images=64, head_backbones=("resnet18",), head_train=128, head_val=32,
              overhead_size=64, overhead_epochs=4, grid_size=48, grid_epochs=4, grid_lrs=(0.01,), grid_grace=1,
              grid_train=342, grid_val=90, gpu_steps=15, rounds=1)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        mem = 0
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        import ray
        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def load_data(data: Path | None, work: Path) -> tuple[Path, dict, str]:
    """(root, class_map, description): the real X-rays when present, else synthetic ones."""
    root = data or (CXR_REAL if CXR_REAL.is_dir() else None)
    if root is not None:
        return root, CLASS_MAP if root == CXR_REAL else {}, f"{root} (real chest X-rays)"
    root = make_synthetic(work / "synthetic", counts={"train": 340, "validation": 90, "test": 20}, image_size=224)
    return root, {}, f"synthetic ({root})"


def subset(index: DatasetIndex, sizes: dict[str, int]) -> DatasetIndex:
    """Every k-th image of each split (the lists are sorted by class, so classes stay mixed)."""
    splits = {}
    for split, items in index.splits.items():
        n = min(sizes.get(split, len(items)), len(items))
        step = max(1, len(items) // max(n, 1))
        splits[split] = items[::step][:n]
    return DatasetIndex(index.root, index.classes, splits, index.original_classes)


def split_sizes(train: int | None, val: int | None) -> dict[str, int]:
    """:func:`subset`'s sizes for the splits given a count (None: the whole split)."""
    return {k: v for k, v in (("train", train), ("validation", val)) if v}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@contextlib.contextmanager
def quiet(logfile: Path):
    """Send this process's stdout/stderr (Ray and Tune's progress output) to ``logfile``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(logfile, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# --- 1. input pipeline ------------------------------------------------------------------------------

def bench_loader(index: DatasetIndex, s: Sizes, work: Path, cores: int) -> dict:
    """Training-pipeline images/s: PIL DataLoader (course transform) vs decoded cache + tensor augmentation.

    Per core (the key): one thread each, PIL decoding in the loop (``num_workers=0``), as a CPU trial
    of covid_tune runs. All cores (reported beside it): PIL in ``cores`` worker processes vs the
    tensor path on ``cores`` threads. The pipelines take turns and each keeps its fastest epoch: a
    burst of someone else's work on a shared machine then hits both, not one.
    """
    sub = subset(index, {"train": s.loader_images})
    n = len(sub.paths("train"))
    build_s, decoded = timed(lambda: cache_mod.build_decoded_cache(sub, s.loader_size, True, work / "loader-cache",
                                                                   splits=("train",)))
    reread_s, _ = timed(lambda: cache_mod.build_decoded_cache(sub, s.loader_size, True, work / "loader-cache",
                                                              splits=("train",)))

    def pil(workers: int):
        return engine.make_loader(sub, "train", s.loader_size, s.loader_batch, "single", {}, train=True,
                                  augment=True, num_workers=workers, seed=0)

    tensor = TensorLoader(decoded["train"], sub.labels("train"), s.loader_size, s.loader_batch, shuffle=True,
                          augment=True, seed=0)
    setups = {"per_core": {"pil": (pil(0), 1), "cache": (tensor, 1)},
              "all_cores": {"pil": (pil(cores), 1), "cache": (tensor, cores)}}
    best = {(k, w): float("inf") for k, v in setups.items() for w in v}
    for e in range(s.rounds + 1):  # round 0 warms up (worker processes start once per trial)
        for k, v in setups.items():
            for which, (loader, threads) in v.items():
                torch.set_num_threads(threads)
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(e)
                t, _ = timed(lambda: sum(len(x) for x, _ in loader))
                if e > 0:
                    best[k, which] = min(best[k, which], t)
    torch.set_num_threads(cores)
    ips = {f"{k}_{which}": n / t for (k, which), t in best.items()}
    return {"images": n, "image_size": s.loader_size, "batch": s.loader_batch, "images_per_s": ips,
            "cache_build_s": build_s, "cache_build_ms_per_image": 1000 * build_s / n, "cache_reread_s": reread_s,
            "all_cores_speedup": ips["all_cores_cache"] / ips["all_cores_pil"],
            "loader_speedup": ips["per_core_cache"] / ips["per_core_pil"]}


def bench_loader_large(s: Sizes, work: Path) -> dict:
    """The per-core comparison again on full-size sources: generated 1024 px X-ray-like PNGs.

    The real images here were already shrunk to 224 px, which makes PIL's decoding cheap; the
    course's datasets hold full-size radiographs, decoded and rotated at full size every epoch.
    """
    root = make_synthetic(work / "synthetic-1024", counts={"train": s.large_images // 2, "validation": 1, "test": 1},
                          image_size=1024)
    index = scan_dataset(root)
    n = len(index.paths("train"))
    build_s, decoded = timed(lambda: cache_mod.build_decoded_cache(index, s.loader_size, True, work / "large-cache",
                                                                   splits=("train",)))
    loaders = {"pil": engine.make_loader(index, "train", s.loader_size, s.loader_batch, "single", {}, train=True,
                                         augment=True, num_workers=0, seed=0),
               "cache": TensorLoader(decoded["train"], index.labels("train"), s.loader_size, s.loader_batch,
                                     shuffle=True, augment=True, seed=0)}
    torch.set_num_threads(1)
    best = {k: float("inf") for k in loaders}
    for e in range(s.rounds):
        for k, loader in loaders.items():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(e)
            best[k] = min(best[k], timed(lambda: sum(len(x) for x, _ in loader))[0])
    torch.set_num_threads(machine()["cores"] or 1)
    return {"images": n, "source_px": 1024, "image_size": s.loader_size, "pil_images_per_s": n / best["pil"],
            "cache_images_per_s": n / best["cache"], "cache_build_ms_per_image": 1000 * build_s / n,
            "speedup": best["pil"] / best["cache"]}


# --- 2. head-only: feature cache ----------------------------------------------------------------------

def bench_head_cache(index: DatasetIndex, s: Sizes, decoded_cache: Path) -> dict:
    """fc_only epoch time: plain path (frozen trunk every step) vs the feature cache, taking turns."""
    sub = subset(index, {"train": s.head_train, "validation": s.head_val})
    decoded = cache_mod.build_decoded_cache(sub, s.head_size, True, decoded_cache, splits=("train", "validation"))
    out = {"train_images": len(sub.paths("train")), "val_images": len(sub.paths("validation")),
           "image_size": s.head_size, "backbones": {}}
    for backbone in s.head_backbones:
        hp = HParams(backbone=backbone, freeze="fc_only", loss="ce", image_size=s.head_size, batch_size=32,
                     head_hidden=240, dropout=0.5, augment=False, lr=0.001, feature_cache="off")
        log(f"head cache: {backbone}, plain path and feature cache taking turns")
        plain = TrainingRun(hp, sub, CPU, decoded=decoded)
        cached = TrainingRun(replace(hp, feature_cache="auto"), sub, CPU, decoded=decoded)
        assert cached.feature_mode == "exact" and plain.feature_mode == "off"
        first_s, _ = timed(cached.run_epoch)  # computes the features once, then trains an epoch
        plain_s, cached_s = [], []
        for _ in range(s.rounds):
            plain_s.append(timed(plain.run_epoch)[0])
            cached_s.append(min(timed(cached.run_epoch)[0] for _ in range(3)))
        out["backbones"][backbone] = {"plain_epoch_s": min(plain_s), "cached_first_epoch_s": first_s,
                                      "cached_epoch_s": min(cached_s), "speedup": min(plain_s) / min(cached_s)}
        del plain, cached
    out["head_cache_speedup"] = min(b["speedup"] for b in out["backbones"].values())
    return out


# --- 3. Ray Tune's overhead ---------------------------------------------------------------------------

def bench_tune_overhead(index: DatasetIndex, s: Sizes, work: Path) -> dict:
    """One trial's wall time inside Tune vs the same training called directly, taking turns.

    One CPU (one thread) each, as covid_tune runs CPU trials. ``tune_overhead`` compares the trial's
    own wall time (Tune's ``time_total_s``: from the trainable's start, with fetching the decoded
    cache from the object store, one report + checkpoint per epoch) with the direct run (model
    construction included in both). Starting the trial's worker process and Tune's book-keeping
    around ``Tuner.fit`` are a fixed cost per trial, reported in seconds beside it.
    """
    from ray import tune

    from covid_tune.trainable import train_trial

    if split_sizes(s.overhead_train, s.overhead_val):
        index = subset(index, split_sizes(s.overhead_train, s.overhead_val))
    decoded = cache_mod.build_decoded_cache(index, s.overhead_size, True, work / "overhead-cache",
                                            splits=("train", "validation"))
    hp = HParams(backbone=s.overhead_backbone, freeze=s.overhead_freeze, loss="ce", image_size=s.overhead_size,
                 batch_size=32, head_hidden=64, dropout=0.3, augment=True, lr=0.01, epochs=s.overhead_epochs)
    fn = tune.with_resources(tune.with_parameters(train_trial, plan={"one": hp}, index=index, cpus=1, gpu=0,
                                                  decoded=decoded), {"cpu": 1})

    def direct() -> tuple[float, list[float]]:
        torch.set_num_threads(1)
        start = time.perf_counter()
        run = TrainingRun(hp, index, CPU, decoded=decoded)
        epochs = []
        while run.epoch < hp.epochs:
            epochs.append(timed(run.run_epoch)[0])
        return time.perf_counter() - start, epochs

    def inside(i: int) -> tuple[float, float]:
        tuner = tune.Tuner(fn, param_space={"config_id": "one"},
                           run_config=tune.RunConfig(name=f"overhead{i}", storage_path=str(work / "ray"), verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        with quiet(work / "ray.log"):
            wall, grid = timed(tuner.fit)
        if grid[0].error:
            raise RuntimeError(f"the Tune trial failed: {grid[0].error}")
        assert grid[0].metrics["epoch"] == hp.epochs and grid[0].metrics["decoded_cache"] == 1
        return wall, grid[0].metrics["time_total_s"], list(grid[0].metrics_dataframe["time_this_iter_s"])

    direct_s, fit_s, trial_s, epochs = [], [], [], {"direct": [], "trial": []}
    for i in range(s.rounds):
        log(f"tune overhead: round {i + 1}/{s.rounds}, direct then inside Tune")
        total, per_epoch = direct()
        direct_s.append(total)
        epochs["direct"].append(per_epoch)
        wall, trial, per_epoch = inside(i)
        fit_s.append(wall)
        trial_s.append(trial)
        epochs["trial"].append(per_epoch)
    base = min(direct_s)
    return {"config": f"{hp.backbone}-{hp.freeze} {hp.image_size} px, {hp.epochs} epochs, "
                      f"{len(index.paths('train'))}+{len(index.paths('validation'))} images, 1 CPU",
            "direct_s": direct_s, "trial_s": trial_s, "tune_fit_s": fit_s, "epoch_s": epochs,
            "tune_overhead": (min(trial_s) - base) / base,
            "fixed_per_trial_s": min(f - t for f, t in zip(fit_s, trial_s)),
            "fit_overhead": (min(fit_s) - base) / base}


# --- 3b. checkpoint size and the time outside trials --------------------------------------------------

def bench_checkpoint(index: DatasetIndex, work: Path) -> dict:
    """Bytes of one fc_only resnet18 checkpoint (after one epoch, so momentum exists): slim vs whole model."""
    import io

    hp = HParams(backbone="resnet18", freeze="fc_only", loss="ce", image_size=64, batch_size=16, head_hidden=64,
                 augment=False, epochs=1)
    run = TrainingRun(hp, subset(index, {"train": 32, "validation": 16}), CPU)
    run.run_epoch()

    def size(state: dict) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    slim = run.state_dict()
    whole = {**{k: v for k, v in slim.items() if k not in ("model_part", "frozen_digest")},
             "model": run.model.state_dict()}
    return {"config": "resnet18 fc_only, head_hidden 64", "slim_bytes": size(slim), "full_bytes": size(whole),
            "checkpoint_kb": size(slim) / 1024}


def bench_outside(work: Path) -> dict:
    """sweeps/demo.yaml end to end in a subprocess; its results.json ``timing``."""
    import subprocess

    out = work / "demo"
    cmd = [sys.executable, "-m", "covid_tune.run", str(REPO / "sweeps" / "demo.yaml"), "--output", str(out),
           "--overwrite"]
    with open(work / "demo.log", "wb") as log_file:
        wall, proc = timed(lambda: subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT))
    if proc.returncode != 0:
        raise RuntimeError(f"the demo sweep failed (exit {proc.returncode}); see {work / 'demo.log'}")
    timing = json.loads((out / "report" / "results.json").read_text())["timing"]
    return {**timing, "process_wall_s": wall}


# --- 4. the whole grid -----------------------------------------------------------------------------------

FREEZE_LEVELS = {"resnet18": ["fc_only", "layer1-3", "layer1", "none"], "vgg16": ["fc_only", "conv1-3", "conv1-2", "none"],
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
    """A DataLoader sampler with :class:`covid_tune.loaders.TensorLoader`'s epoch order."""

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
    from covid_tune import plan as plan_mod
    from covid_tune import results as results_mod
    from covid_tune import run as run_mod
    from covid_tune import tuning
    from covid_tune.spec import validate

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

def flops_per_image(backbone: str, size: int) -> float:
    """Training FLOPs per image: the forward pass counted by torch's FlopCounterMode, times 3 (fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    from covid_tune.models import create_model

    model = create_model(backbone, 2, head_hidden=240).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return 3.0 * counter.get_total_flops()


def peak_flops(name: str) -> float | None:
    if os.environ.get("COVID_TUNE_PEAK_FLOPS"):
        return float(os.environ["COVID_TUNE_PEAK_FLOPS"])
    return next((v for k, v in PEAK_BF16.items() if k.lower() in name.lower()), None)


def gpu_train_steps(k: int, loader, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                    amp_dtype: torch.dtype | None = None) -> int:
    """Train ``k`` steps, passing over ``loader`` as often as needed; waits for the GPU; returns images seen."""
    loss_fn = torch.nn.CrossEntropyLoss()
    done, images, epoch = 0, 0, 0
    while done < k:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done, images = done + 1, images + len(x)
            if done >= k:
                break
    torch.cuda.synchronize()
    return images


def gpu_images_per_s(backbone: str, s: Sizes, device: torch.device) -> float:
    """Training images/s of one backbone on the GPU path: uint8 split on the GPU, tensor augmentation,
    bf16 autocast, channels_last, all layers trainable."""
    from covid_tune.models import create_model

    torch.manual_seed(0)
    n = s.gpu_batch * 4
    images = torch.randint(0, 256, (n, 1, 256, 256), dtype=torch.uint8)  # a decoded-cache-like split
    amp_dtype, channels_last = engine.resolve_precision("auto", device)
    model = create_model(backbone, 2, head_hidden=240).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = engine.make_optimizer(model, "sgd", 1e-3, 0.9, 0.0)
    loader = TensorLoader(images, torch.randint(0, 2, (n,)), 224, s.gpu_batch, shuffle=True, augment=True,
                          device=device, channels_last=channels_last)
    gpu_train_steps(5, loader, model, opt, device, amp_dtype)  # warm-up: cuDNN autotuning, allocator
    t, imgs = timed(lambda: gpu_train_steps(s.gpu_steps, loader, model, opt, device, amp_dtype))
    return imgs / t


def course_gpu_images_per_s(backbone: str, s: Sizes, device: torch.device, index: DatasetIndex, workers: int) -> float:
    """Training images/s of one backbone the course's way on the same GPU: PIL DataLoader with
    ``workers`` processes (decode + augmentation every epoch), float32, default memory format."""
    from covid_tune.models import create_model

    torch.manual_seed(0)
    model = create_model(backbone, 2, head_hidden=240).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    loader = engine.make_loader(index, "train", 224, s.gpu_batch, "single", {}, train=True, augment=True,
                                num_workers=workers, seed=0)
    gpu_train_steps(3, loader, model, opt, device)  # warm-up: worker processes, cuDNN autotuning
    t, imgs = timed(lambda: gpu_train_steps(s.gpu_steps, loader, model, opt, device))
    return imgs / t


def bench_gpu(s: Sizes, index: DatasetIndex, cores: int) -> dict:
    """Training images/s per backbone at 224 px on the GPU path, that as a fraction of peak, and the
    course's way (PIL DataLoader workers, float32) on the same GPU beside it."""
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    workers = min(8, cores)
    out = {"device": name, "peak_bf16_flops": peak, "image_size": 224, "batch": s.gpu_batch,
           "course_workers": workers, "backbones": {}}
    for backbone in ("resnet18", "vgg16"):
        ips = gpu_images_per_s(backbone, s, device)
        torch.cuda.empty_cache()
        course = course_gpu_images_per_s(backbone, s, device, index, workers)
        torch.cuda.empty_cache()
        fpi = flops_per_image(backbone, 224)
        out["backbones"][backbone] = {"images_per_s": ips, "course_images_per_s": course, "speedup": ips / course,
                                      "train_flops_per_image": fpi, "mfu": (fpi * ips / peak) if peak else None}
    out["gpu_mfu"] = {b: v["mfu"] for b, v in out["backbones"].items()}
    return out


# --- table ------------------------------------------------------------------------------------------------

def goal(key: str) -> str:
    """The target cell of ``key``'s row, from TARGETS (one place for each number)."""
    op, target = TARGETS[key]
    return f"{op} {target:g}"


def verdict(key: str, value) -> str:
    if value is None:
        return "n/a"
    op, target = TARGETS[key]
    ok = {"<=": value <= target, ">=": value >= target, "==": value == target}[op]
    return "met" if ok else "MISSED"


def table(res: dict) -> str:
    r = res["results"]
    lines = ["| measure | plain / course way | covid_tune | ratio [key] | target | |",
             "|---|---|---|---|---|---|"]
    if "loader" in r:
        x = r["loader"]
        ips = x["images_per_s"]
        lines.append(f"| training input pipeline with augmentation, {x['image_size']} px, per core | "
                     f"{ips['per_core_pil']:,.0f} img/s (PIL DataLoader) | {ips['per_core_cache']:,.0f} img/s "
                     f"(decoded cache, tensor augmentation) | {x['loader_speedup']:.1f}x [loader_speedup] | {goal('loader_speedup')} | "
                     f"{verdict('loader_speedup', x['loader_speedup'])} |")
        lines.append(f"| the same, all cores | {ips['all_cores_pil']:,.0f} img/s (worker processes) | "
                     f"{ips['all_cores_cache']:,.0f} img/s (threads) | {x['all_cores_speedup']:.1f}x | | |")
    if "loader_large" in r:
        x = r["loader_large"]
        lines.append(f"| the same per core, {x['images']} full-size ({x['source_px']} px, synthetic) sources | "
                     f"{x['pil_images_per_s']:,.0f} img/s | {x['cache_images_per_s']:,.0f} img/s | "
                     f"{x['speedup']:.0f}x | | |")
    if "head_cache" in r:
        x = r["head_cache"]
        for b, v in x["backbones"].items():
            lines.append(f"| head-only epoch, {b} fc_only, {x['image_size']} px, {x['train_images']}+"
                         f"{x['val_images']} images | {v['plain_epoch_s']:.2f} s | {v['cached_epoch_s']:.3f} s "
                         f"(first epoch with extraction {v['cached_first_epoch_s']:.2f} s) | {v['speedup']:.0f}x "
                         f"[head_cache_speedup] | {goal('head_cache_speedup')} | {verdict('head_cache_speedup', v['speedup'])} |")
    if "tune_overhead" in r:
        x = r["tune_overhead"]
        lines.append(f"| one trial, direct vs inside Tune ({x['config']}) | {min(x['direct_s']):.1f} s | "
                     f"{min(x['trial_s']):.1f} s trial time (+{x['fixed_per_trial_s']:.1f} s worker start-up and "
                     f"Tune book-keeping per trial) | {x['tune_overhead']:+.3f} [tune_overhead] | {goal('tune_overhead')} | "
                     f"{verdict('tune_overhead', x['tune_overhead'])} |")
    if "checkpoint" in r:
        x = r["checkpoint"]
        lines.append(f"| one checkpoint, {x['config']} (weights + momentum) | {x['full_bytes'] / 1e6:.1f} MB "
                     f"(whole model) | {x['checkpoint_kb']:.0f} KB (trained part) | {x['checkpoint_kb']:.0f} KB "
                     f"[checkpoint_kb] | {goal('checkpoint_kb')} | {verdict('checkpoint_kb', x['checkpoint_kb'])} |")
    if "outside" in r:
        x = r["outside"]
        ph = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in x["phases_s"].items() if k != "trials")
        lines.append(f"| sweeps/demo.yaml end to end, time outside the trials | | {x['wall_s']:.0f} s wall, trials "
                     f"{x['phases_s']['trials']:.0f} s; outside (s): {ph} | {x['outside_trials']:.3f} [outside_trials] "
                     f"| {goal('outside_trials')} | {verdict('outside_trials', x['outside_trials'])} |")
    if "grid" in r:
        x = r["grid"]
        lines.append(f"| whole grid, {x['configurations']} configurations x {x['epochs']} epochs, {x['image_size']} px, "
                     f"{x['train_images']}+{x['val_images']} images | {x['course_s']:.0f} s "
                     f"({x['course_epochs_trained']} epochs) | {x['covid_tune_s']:.0f} s ({x['covid_tune_epochs_trained']} "
                     f"epochs, Ray start {x['covid_tune_ray_start_s']:.0f} s included) | {x['grid_speedup']:.1f}x "
                     f"[grid_speedup] | {goal('grid_speedup')} | {verdict('grid_speedup', x['grid_speedup'])} |")
        lines.append(f"| best configuration (lowest val loss) | {x['course_best']['config']} | "
                     f"{x['covid_tune_best']['config']} | {x['same_best_config']} [same_best_config] | same | "
                     f"{verdict('same_best_config', x['same_best_config'])} |")
    if "gpu" in r:
        x = r["gpu"]
        for b, v in x["backbones"].items():
            mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "peak unknown"
            lines.append(f"| {b} training on {x['device']}, 224 px | {v['course_images_per_s']:,.0f} img/s (PIL, "
                         f"{x['course_workers']} workers, fp32) | {v['images_per_s']:,.0f} img/s (data on the GPU, bf16, "
                         f"channels_last; MFU {mfu} [gpu_mfu]) | {v['speedup']:.1f}x | | |")
    else:
        lines.append("| GPU images/s and MFU [gpu_mfu] | | no GPU on this machine | n/a | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on 2 CPU cores")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--data", type=Path, help=f"ImageFolder tree to use (default: {CXR_REAL} when present)")
    p.add_argument("--only", nargs="*", choices=["loader", "head_cache", "gpu", "tune_overhead", "grid",
                                                 "checkpoint", "outside"],
                   help="run only these parts")
    p.add_argument("--rounds", type=int, help="repeats of the side-by-side measurements, fastest kept "
                                               "(default: 1 with --quick, else 2)")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = replace(s, rounds=args.rounds)
    parts = set(args.only or ["loader", "head_cache", "gpu", "tune_overhead", "grid", "checkpoint", "outside"])
    cores = machine()["cores"] or 1
    torch.set_num_threads(cores)
    work = args.keep or Path(tempfile.mkdtemp(prefix="covid_tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res: dict = {"machine": machine(), "mode": "quick" if args.quick else "full", "sizes": asdict(s), "results": {}}
    try:
        root, class_map, what = load_data(args.data, work)
        res["data"] = what
        index = scan_dataset(root, class_map)
        log(f"data: {what}: {', '.join(f'{k} {len(v)}' for k, v in index.splits.items())}; work folder {work}")
        if "loader" in parts:
            log("input pipeline")
            res["results"]["loader"] = bench_loader(index, s, work, cores)
            res["results"]["loader_large"] = bench_loader_large(s, work)
        if "head_cache" in parts:
            res["results"]["head_cache"] = bench_head_cache(index, s, work / "head-cache")
        if "checkpoint" in parts:
            log("checkpoint size")
            res["results"]["checkpoint"] = bench_checkpoint(index, work)
        if "outside" in parts:
            log("sweeps/demo.yaml end to end")
            res["results"]["outside"] = bench_outside(work)
        if "gpu" in parts and torch.cuda.is_available():
            log("GPU")
            res["results"]["gpu"] = bench_gpu(s, index, cores)
        if parts & {"tune_overhead", "grid"}:
            from covid_tune import tuning

            # Ray runs its workers at nice 15; on a machine shared with other jobs that alone would
            # slow the Tune side down, so both sides compete for the CPU on equal terms here
            os.environ.setdefault("RAY_worker_niceness", "0")
            log("starting Ray")
            import ray

            with quiet(work / "ray.log"):
                # a private local Ray: ray.init() without an address would join any cluster that
                # `ray start` left running on this machine (someone else's, on a shared one)
                ray_start_s, _ = timed(lambda: ray.init(address="local", include_dashboard=False,
                                                        object_store_memory=512 * 1024**2, log_to_driver=True))
            assert tuning.ray.is_initialized()
            res["results"]["ray_start_s"] = ray_start_s
            if "tune_overhead" in parts:
                res["results"]["tune_overhead"] = bench_tune_overhead(index, s, work)
            if "grid" in parts:
                res["results"]["grid"] = bench_grid(root, class_map, s, work, cores, ray_start_s)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["total_s"] = time.perf_counter() - started
    r = res["results"]
    res["ratios"] = {
        "head_cache_speedup": r.get("head_cache", {}).get("head_cache_speedup"),
        "loader_speedup": r.get("loader", {}).get("loader_speedup"),
        "tune_overhead": r.get("tune_overhead", {}).get("tune_overhead"),
        "grid_speedup": r.get("grid", {}).get("grid_speedup"),
        "same_best_config": r.get("grid", {}).get("same_best_config"),
        "gpu_mfu": r.get("gpu", {}).get("gpu_mfu"),
        "checkpoint_kb": r.get("checkpoint", {}).get("checkpoint_kb"),
        "outside_trials": r.get("outside", {}).get("outside_trials"),
    }
    m = res["machine"]
    print(f"\ncovid_tune benchmarks ({res['mode']}), {time.strftime('%Y-%m-%d')}: {m['cores']} cores ({m['cpu']}), "
          f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, Ray {m.get('ray', '-')}; "
          f"load average {m['load_average_start']:.1f} -> {m['load_average_end']:.1f}; data: {res['data']}; "
          f"{res['total_s']:.0f} s in all\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
