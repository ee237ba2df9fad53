"""Head-only epoch: through the frozen trunk vs cached features (head_cache_speedup)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common import CPU, Sizes, log, subset, timed

from covid_tune.data import cache as cache_mod
from covid_tune.data.dataset import DatasetIndex
from covid_tune.engine.hparams import HParams
from covid_tune.engine.training import TrainingRun


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
