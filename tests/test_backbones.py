"""The backbones added for the field's comparisons (densenet121, efficientnet_b0, convnext_tiny, resnet50):
each trains one epoch through the engine at 64 px with ``weights: none``, its frozen prefix untouched and
computed once (the feature cache), and has a working Grad-CAM layer. Freeze boundaries, trainable counts
and weights files are in tests/test_models.py."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from engine_helpers import CPU, TINY_HP

from covid_tune.engine.explain import grad_cam
from covid_tune.engine.training import TrainingRun
from covid_tune.models.freeze import under

# 2 images per class per split at 64 px (at 32 px, eval mode of a resnet50 two steps from its random init
# overflows to nan: BatchNorm statistics of two 2-image batches)
SYNTHETIC = {"counts": {"train": 2, "validation": 2, "test": 2}, "image_size": 72, "decoded_size": 64}
NEW = ["resnet50", "densenet121", "efficientnet_b0", "convnext_tiny"]
# a level that freezes a prefix of the trunk but trains the rest of it, per backbone
MIDDLE = {"resnet50": "layer1-3", "densenet121": "block1-3", "efficientnet_b0": "stage1-5",
          "convnext_tiny": "stage1-3"}
# fc_only (the head on cached features) is quick; training the trunk's rest on a CPU takes seconds: slow
CASES = [pytest.param(b, lvl, id=f"{b}-{lvl}", marks=[pytest.mark.slow] if lvl != "fc_only" else [])
         for b in NEW for lvl in ("fc_only", MIDDLE[b], "none")]


@pytest.mark.parametrize("backbone, level", CASES)
def test_one_epoch_at_64px(index, decoded, backbone: str, level: str) -> None:
    hp = replace(TINY_HP, backbone=backbone, freeze=level, image_size=64, batch_size=2, weights="none",
                 feature_cache="auto", lr=1e-3)
    run = TrainingRun(hp, index, CPU, decoded=decoded)
    frozen = run.model.frozen
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    metrics = run.run_epoch()
    assert metrics["epoch"] == 1
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "val_loss", "val_acc")), metrics
    assert 0 <= metrics["val_acc"] <= 1
    after = run.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(under(k.removeprefix("net."), frozen) for k in moved)  # the frozen prefix: bit for bit
    assert moved  # and the rest trained
    # a frozen prefix (no augmentation here) is computed once: what follows it trains on its outputs
    assert run.feature_mode == ("off" if level == "none" else "exact")
    assert run.split.head_only == (level == "fc_only")


@pytest.mark.parametrize("backbone", NEW)
def test_grad_cam_layer_gives_maps(backbone: str) -> None:
    from covid_tune.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(backbone, 2, freeze="fc_only", head_hidden=8).eval()
    maps = grad_cam(model, backbone, torch.randn(2, 3, 64, 64), classes=[0, 1])
    assert maps.shape == (2, 64, 64)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
