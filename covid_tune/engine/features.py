"""The feature cache: a frozen prefix's outputs computed once, so what follows it trains on them.

:func:`plan_feature_cache` decides, before training, whether a trial uses it (the setting, whether
the inputs are augmented, whether the outputs fit the memory budget); :func:`feature_loaders`
computes the features and batches them. Plain functions on a model, its :class:`~covid_tune.models.freeze.PrefixSplit`
and loaders: no knowledge of where the images come from.

Configurations that share the prefix and its inputs (same backbone, freeze level, weights and seed; another
lr, loss or dropout) get the same outputs: a :class:`FeatureStore` lets them compute them once, under
:func:`feature_key`. The default is no store (each run computes its own); a Ray sweep's store is
:class:`covid_tune.sweep.trainable.RayFeatureStore`, and nothing here knows Ray.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import nn

from covid_tune.data.augment import augment_settings
from covid_tune.data.loaders import FeatureLoader
from covid_tune.engine.hparams import HParams
from covid_tune.models.freeze import PrefixSplit

FEATURE_CACHE_MODES = ("auto", "on", "off")
T = TypeVar("T")


class FeatureStore(Protocol):
    """Somewhere prefix outputs computed by one run are found by the next run with the same key."""

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        """The value stored under ``key``, or ``compute()``, stored there (computed once per key)."""
        ...


def feature_cache_mode(setting: str, has_prefix: bool, augment: bool) -> str:
    """``off``, ``exact`` or ``inexact`` (features without the training augmentation).

    Outputs of the frozen prefix computed once equal what the plain path computes every step only
    when training inputs are not augmented, so ``auto`` turns the cache on only then; ``on`` also
    turns it on with augmentation (faster, but what follows the prefix then never sees augmented
    images). Only configurations with a frozen prefix (every level but ``none``) can use it; for
    ``fc_only`` the prefix is the whole trunk and only the head trains on the cached features.
    """
    if setting not in FEATURE_CACHE_MODES:
        raise KeyError(f"unknown feature_cache {setting!r}; choose one of: {', '.join(FEATURE_CACHE_MODES)}")
    if setting == "off" or not has_prefix:
        return "off"
    if not augment:
        return "exact"
    return "inexact" if setting == "on" else "off"


@torch.no_grad()
def prefix_output_bytes(model: nn.Module, prefix: nn.Module, image_size: int, device: torch.device,
                        amp_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``prefix``'s output for one image (its shape and dtype, as the feature cache keeps it).

    Run with ``model`` in eval mode, so no BatchNorm statistics move; its mode is restored after.
    """
    was = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = prefix(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was)
    return out.numel() * out.element_size()


@torch.no_grad()
def extract_features(model: nn.Module, prefix: nn.Module, loader, device: torch.device,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix``'s outputs and the targets over ``loader`` (in its order), with ``model`` in eval mode.

    Kept in the dtype the prefix produced (bf16 under bf16 autocast): the network's remaining layers
    get exactly what they would get from the prefix on the plain path, in half the memory.
    """
    model.eval()
    feats, targets = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            feats.append(prefix(images))  # in the dtype the plain path hands to the rest of the network
        targets.append(y.to(device, non_blocking=True))
    return torch.cat(feats), torch.cat(targets)



@dataclass(frozen=True)
class FeaturePlan:
    """Whether a trial trains on cached prefix outputs (``mode``: off, exact, inexact) and what they take."""

    mode: str
    bytes: int = 0  # the cached outputs of train + validation, when the cache was considered

    @property
    def on(self) -> bool:
        return self.mode != "off"


def plan_feature_cache(hp: HParams, model: nn.Module, split: PrefixSplit, n_images: int, device: torch.device,
                       amp_dtype: torch.dtype | None = None) -> FeaturePlan:
    """:func:`feature_cache_mode` for ``hp``, turned off again when ``n_images`` prefix outputs (one probe
    forward pass, in eval mode) would take more than ``hp.feature_cache_gb``."""
    mode = feature_cache_mode(hp.feature_cache, bool(split), augment_settings(hp.augment) is not None)
    if mode == "off":
        return FeaturePlan(mode)
    need = n_images * prefix_output_bytes(model, split.prefix, hp.image_size, device, amp_dtype)
    if need > hp.feature_cache_gb * 1e9:
        mode = "off"  # over the budget: the prefix runs every step instead
    return FeaturePlan(mode, need)


def feature_loaders(model: nn.Module, split: PrefixSplit, train_images, val_images, batch_size: int, seed: int,
                    device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                    store: FeatureStore | None = None, key: str = "") -> tuple[FeatureLoader, FeatureLoader]:
    """Train (shuffled by ``seed``) and validation loaders over ``split``'s prefix outputs of the images
    ``train_images`` and ``val_images`` yield (un-augmented, in a fixed order); with a ``store``, the
    outputs stored under ``key`` when another run computed them."""
    def compute() -> tuple[torch.Tensor, ...]:
        args = (device, amp_dtype, channels_last)
        return (*extract_features(model, split.prefix, train_images, *args),
                *extract_features(model, split.prefix, val_images, *args))

    tensors = compute() if store is None else tuple(t.to(device) for t in store.get_or_compute(key, compute))
    train_x, train_y, val_x, val_y = tensors
    return (FeatureLoader(train_x, train_y, batch_size, shuffle=True, seed=seed),
            FeatureLoader(val_x, val_y, batch_size))


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over ``module``'s state_dict: names, dtypes, shapes and bytes (exact, unlike the
    checkpoint's frozen digest, which only has to catch another initialisation)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_key(prefix: nn.Module, inputs: list, amp_dtype: torch.dtype | None, channels_last: bool,
                device: torch.device, batch_size: int) -> str:
    """When two runs' prefix outputs are the same: the prefix's weights, what its inputs are made of
    (``inputs``: the split files, the decoded cache's keys, crop, grayscale, targets' encoding), the
    precision, the memory format, the device type and the batch size they are computed in (kernels
    may sum in another order for another batch shape)."""
    settings = [weights_digest(prefix), inputs, str(amp_dtype), channels_last, device.type, batch_size]
    return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()
