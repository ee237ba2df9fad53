"""Input pipeline: PIL DataLoader vs the decoded cache (loader_speedup)."""

from __future__ import annotations

from pathlib import Path

import torch
from common import Sizes, machine, subset, timed

from covid_tune.data import cache as cache_mod
from covid_tune.data.dataset import DatasetIndex, scan_dataset
from covid_tune.data.loaders import TensorLoader, make_loader
from covid_tune.data.synthetic import make_synthetic


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
        return make_loader(sub, "train", s.loader_size, s.loader_batch, "single", {}, train=True,
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
                t, _ = timed(lambda loader=loader: sum(len(x) for x, _ in loader))
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
    loaders = {"pil": make_loader(index, "train", s.loader_size, s.loader_batch, "single", {}, train=True,
                                         augment=True, num_workers=0, seed=0),
               "cache": TensorLoader(decoded["train"], index.labels("train"), s.loader_size, s.loader_batch,
                                     shuffle=True, augment=True, seed=0)}
    torch.set_num_threads(1)
    best = {k: float("inf") for k in loaders}
    for e in range(s.rounds):
        for k, loader in loaders.items():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(e)
            best[k] = min(best[k], timed(lambda loader=loader: sum(len(x) for x, _ in loader))[0])
    torch.set_num_threads(machine()["cores"] or 1)
    return {"images": n, "source_px": 1024, "image_size": s.loader_size, "pil_images_per_s": n / best["pil"],
            "cache_images_per_s": n / best["cache"], "cache_build_ms_per_image": 1000 * build_s / n,
            "speedup": best["pil"] / best["cache"]}


# --- 2. head-only: feature cache ----------------------------------------------------------------------
