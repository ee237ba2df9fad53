"""Shared by every benchmark: data, sizes, timing, machine facts, TARGETS/goal() and the report table."""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that wait sleep instead of spinning. On a machine shared with
# other jobs, a spinning two-thread process stalls whenever one core is taken (steps 10x slower);
# passive waiting costs an idle machine up to ~15% on two threads. Both sides run under it (Ray's
# workers inherit it). Set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from covid_tune.data.dataset import DatasetIndex
from covid_tune.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
CXR_REAL = (REPO / ".." / "shared" / "cxr-real").resolve()
CLASS_MAP = {"covid": "infected", "pneumonia": "infected"}
CPU = torch.device("cpu")

TARGETS = {"head_cache_speedup": (">=", 20.0), "loader_speedup": (">=", 5.0), "tune_overhead": ("<=", 0.03),
           "grid_speedup": (">=", 3.0), "same_best_config": ("==", True), "checkpoint_kb": ("<=", 1024.0),
           "outside_trials": ("<=", 0.25), "demo_disk_mb": ("<=", 150.0),
           "cxr_real_disk_mb": ("<=", 400.0), "gpu_mfu_resnet18": (">=", 0.15),
           "gpu_mfu_vgg16": (">=", 0.32)}

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
    # tune_overhead's trial: fc_only, the case (one trainable layer, a checkpoint of KBs); the
    # same measured again with overhead_large_freeze (layer1: ~88 MB of weights + momentum per epoch)
    overhead_freeze: str = "fc_only"
    overhead_large_freeze: str | None = "layer1"
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


def spread(x: dict) -> str:
    """`, spread lo..hi` of tune_overhead's paired rounds, empty for a result without them."""
    lo_hi = x.get("tune_overhead_spread")
    return f", spread {lo_hi[0]:+.3f}..{lo_hi[1]:+.3f}" if lo_hi else ""


def steady(x: dict) -> str:
    """`; steady epochs +r` (epochs after the first, where a fresh worker warms up), empty without it."""
    return f"; steady epochs {x['epoch_overhead']:+.3f}" if "epoch_overhead" in x else ""


def judged(text: str, key: str, value) -> str:
    """The last three cells of a table row for a figure with a goal: ``text [key] | goal | verdict |``."""
    return f"{text} [{key}] | {goal(key)} | {verdict(key, value)} |"


def table(res: dict) -> str:
    r = res["results"]
    lines = ["| measure | plain / course way | covid_tune | ratio [key] | target | |",
             "|---|---|---|---|---|---|"]
    if "loader" in r:
        x = r["loader"]
        ips = x["images_per_s"]
        lines.append(f"| training input pipeline with augmentation, {x['image_size']} px, per core | "
                     f"{ips['per_core_pil']:,.0f} img/s (PIL DataLoader) | {ips['per_core_cache']:,.0f} img/s "
                     f"(decoded cache, tensor augmentation) | "
                     + judged(f"{x['loader_speedup']:.1f}x", "loader_speedup", x["loader_speedup"]))
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
                         f"(first epoch with extraction {v['cached_first_epoch_s']:.2f} s) | "
                         + judged(f"{v['speedup']:.0f}x", "head_cache_speedup", v["speedup"]))
    if "tune_overhead" in r:
        x = r["tune_overhead"]
        lines.append(f"| one trial, direct vs inside Tune ({x['config']}) | {min(x['direct_s']):.1f} s | "
                     f"{min(x['trial_s']):.1f} s trial time (+{x['fixed_per_trial_s']:.1f} s worker start-up and "
                     f"Tune book-keeping per trial) | " + judged(
                         f"{x['tune_overhead']:+.3f} (median of {len(x.get('tune_overhead_rounds', [0]))} alternating "
                         f"rounds{spread(x)}{steady(x)})", "tune_overhead", x["tune_overhead"]))
    if "tune_overhead_large" in r:
        x = r["tune_overhead_large"]
        lines.append(f"| the same, {x['config']}: the largest checkpoint ({x['checkpoint_mb']:.0f} MB per epoch) | "
                     f"{min(x['direct_s']):.1f} s | {min(x['trial_s']):.1f} s | {x['tune_overhead']:+.3f} (steady "
                     f"epochs {x['epoch_overhead']:+.3f}{spread(x)}) | | |")
    if "checkpoint" in r:
        x = r["checkpoint"]
        lines.append(f"| one checkpoint, {x['config']} (weights + momentum) | {x['full_bytes'] / 1e6:.1f} MB "
                     f"(whole model) | {x['checkpoint_kb']:.0f} KB (trained part) | "
                     + judged(f"{x['checkpoint_kb']:.0f} KB", "checkpoint_kb", x["checkpoint_kb"]))
    if "outside" in r:
        x = r["outside"]
        ph = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in x["phases_s"].items() if k != "trials")
        lines.append(f"| sweeps/demo.yaml end to end, time outside the trials | | {x['wall_s']:.0f} s wall, trials "
                     f"{x['phases_s']['trials']:.0f} s; outside (s): {ph} | "
                     + judged(f"{x['outside_trials']:.3f}", "outside_trials", x["outside_trials"]))
        if "disk_mb" in x:
            d = x["disk_mb"]
            lines.append(f"| sweeps/demo.yaml end to end, disk left | | {d['total']:.0f} MB (ray/ {d['ray']:.0f} MB, "
                         f"best/ {d['best']:.0f} MB) | " + judged(f"{d['total']:.0f} MB", "demo_disk_mb", d["total"]))
    if "grid" in r:
        x = r["grid"]
        lines.append(f"| whole grid, {x['configurations']} configurations x {x['epochs']} epochs, "
                     f"{x['image_size']} px, "
                     f"{x['train_images']}+{x['val_images']} images | {x['course_s']:.0f} s "
                     f"({x['course_epochs_trained']} epochs) | {x['covid_tune_s']:.0f} s "
                     f"({x['covid_tune_epochs_trained']} epochs, "
                     f"Ray start {x['covid_tune_ray_start_s']:.0f} s included) | "
                     + judged(f"{x['grid_speedup']:.1f}x", "grid_speedup", x["grid_speedup"]))
        lines.append(f"| best configuration (lowest val loss) | {x['course_best']['config']} | "
                     f"{x['covid_tune_best']['config']} | {x['same_best_config']} [same_best_config] | same | "
                     f"{verdict('same_best_config', x['same_best_config'])} |")
    if "gpu" in r:
        x = r["gpu"]
        for b, v in x["backbones"].items():
            mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "peak unknown"
            lines.append(f"| {b} training on {x['device']}, 224 px | {v['course_images_per_s']:,.0f} img/s (PIL, "
                         f"{x['course_workers']} workers, fp32) | {v['images_per_s']:,.0f} img/s "
                         "(data on the GPU, bf16, "
                         f"channels_last; MFU {mfu} [gpu_mfu]) | {v['speedup']:.1f}x | | |")
            c = v["compiled"][v["compiled_best_batch"]]
            key = f"gpu_mfu_{b}"
            arms = ", ".join(f"batch {n}: {a['images_per_s']:,.0f} img/s, compiled in {a['compile_s']:.0f} s"
                             for n, a in v["compiled"].items())
            lines.append(f"| {b} under torch.compile (trainer.compile: on), 224 px | {v['images_per_s']:,.0f} img/s "
                         f"(eager, batch {x['batch']}) | {arms} | "
                         + (judged(f"MFU {c['mfu']:.1%}", key, c["mfu"]) if c["mfu"] is not None
                            else f"{c['vs_eager']:.2f}x eager, peak unknown | {goal(key)} | n/a |"))
    else:
        lines.append("| GPU images/s and MFU [gpu_mfu] | | no GPU on this machine | n/a | | |")
    return "\n".join(lines)


