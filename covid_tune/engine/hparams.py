"""One trial's hyperparameters, fully resolved: the vocabulary every engine-side step reads.

Kept apart from :mod:`covid_tune.engine.training` so the steps a :class:`~covid_tune.engine.training.TrainingRun` is
built from (the model in :mod:`covid_tune.models.registry`, the data source in :mod:`covid_tune.data.loaders`, the
feature-cache plan in :mod:`covid_tune.engine.features`) take it without importing the engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class HParams:
    """Everything one trial needs to train, fully resolved."""

    backbone: str
    freeze: str
    loss: str
    seed: int = 0
    group: str = ""
    fold: int | None = None  # data.folds: the held-out fold this trial validates on (covid_tune.data.folds)
    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (covid_tune.engine.training.epoch_lr)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 40
    head_hidden: int = 240
    dropout: float = 0.5
    weights: str = "none"
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0
    image_size: int = 224
    label_mode: str = "single"
    implies: dict = field(default_factory=dict)
    threshold: float = 0.5
    grayscale: bool = True
    # none | light | course | {rotation, scale, ratio, flip} (covid_tune.data.augment.augment_settings); true/false
    # are course/none
    augment: str | dict | bool = "course"
    num_workers: int = 0
    feature_cache: str = "auto"  # auto | on | off: train what follows the frozen prefix on its outputs, computed once
    feature_cache_gb: float = 2.0  # the most memory (GB) one trial's cached prefix outputs may take
    precision: str = "auto"  # auto (bf16 autocast + channels_last on CUDA, fp32 elsewhere) | bf16 | fp32
    # auto | on | off: torch.compile the training forward (covid_tune.engine.training.resolve_compile)
    compile: str = "auto"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (what dropout and weight init draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
