"""The training engine: plain functions and one small class, no Ray, no YAML.

``TrainingRun(hparams, dataset_index)`` builds model, optimizer, loss and loaders;
``train_one_epoch`` and ``evaluate`` are usable on their own (torchvision references style).

Two input pipelines: without a decoded cache, PIL decode + torchvision transforms in a
``DataLoader`` (the course's way); with one (``decoded=``, :mod:`covid_tune.cache`), uint8
tensors kept on the trial's device and augmented there (:mod:`covid_tune.loaders`). On either,
a frozen prefix of the network runs under ``torch.no_grad()``, and a head-only configuration can
train on features computed once (``feature_cache``). On CUDA, training runs under bf16 autocast
with channels_last (``precision``).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_tune import data as data_mod
from covid_tune.cache import DecodedSplits
from covid_tune.checkpoints import frozen_digest, is_slim, load_model_state, model_state
from covid_tune.loaders import SHUFFLE_STREAM, FeatureLoader, TensorLoader, epoch_generator
from covid_tune.losses import build_loss
from covid_tune.metrics import multi_label_metrics, single_label_metrics
from covid_tune.models import SplitForward, create_model, split_frozen_prefix

FEATURE_CACHE_MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class HParams:
    """Everything one trial needs to train, fully resolved."""

    backbone: str
    freeze: str
    loss: str
    seed: int = 0
    group: str = ""
    epochs: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-3
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
    augment: bool = True
    num_workers: int = 0
    feature_cache: str = "auto"  # auto | on | off: train what follows the frozen prefix on its outputs, computed once
    feature_cache_gb: float = 2.0  # the most memory (GB) one trial's cached prefix outputs may take
    precision: str = "auto"  # auto (bf16 autocast + channels_last on CUDA, fp32 elsewhere) | bf16 | fp32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(hp: HParams, num_classes: int, pretrained: dict | None = None) -> nn.Module:
    """A trial's model as it starts training, on the CPU: :func:`create_model` with ``hp``'s weights
    (``pretrained``, the backbone's state_dict resolved by the caller, instead of reading ``hp.weights``),
    right after seeding with ``hp.seed``. The same call gives the same initial state every time, which
    is where a slim checkpoint's frozen layers come from (:mod:`covid_tune.checkpoints`)."""
    seed_everything(hp.seed)
    weights = pretrained if pretrained is not None and hp.weights != "none" else hp.weights
    return create_model(hp.backbone, num_classes, freeze=hp.freeze, weights=weights,
                        head_hidden=hp.head_hidden, dropout=hp.dropout)


def full_model_state(hp: HParams, num_classes: int, state: dict,
                     pretrained: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole model's state_dict of a checkpoint (slim or full), on the CPU; leaves the RNGs as they were."""
    if not is_slim(state):
        return state["model"]
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        model = build_model(hp, num_classes, pretrained)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    load_model_state(model, state)
    return model.state_dict()


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over parameter, gradient and momentum per step instead of several (CPU and CUDA);
    # it counts on a head-only VGG16, whose classifier holds 120M parameters
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    raise KeyError(f"unknown optimizer {name!r}; choose one of: sgd, adam")


def predict(logits: torch.Tensor, label_mode: str, threshold: float) -> torch.Tensor:
    """Class indices (single-label) or 0/1 rows (multi-label, sigmoid >= threshold)."""
    if label_mode == "single":
        return logits.argmax(1)
    return (torch.sigmoid(logits) >= threshold).long()


def score(y_true: np.ndarray, y_pred: np.ndarray, label_mode: str, n_classes: int) -> dict:
    if label_mode == "single":
        return single_label_metrics(y_true, y_pred, n_classes)
    return multi_label_metrics(y_true, y_pred)


@dataclass
class EpochResult:
    """Mean loss, metrics, and the raw targets/predictions they came from."""

    loss: float
    metrics: dict
    y_true: np.ndarray
    y_pred: np.ndarray

    def summary(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.metrics["acc"], f"{prefix}_f1": self.metrics["f1"]}


def _run(model: nn.Module, loader, loss_fn: nn.Module, device: torch.device, label_mode: str,
         threshold: float, n_classes: int, optimizer: torch.optim.Optimizer | None,
         amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> EpochResult:
    # sums stay on the device: one host sync per epoch instead of one per step
    total, count, trues, preds = torch.zeros((), dtype=torch.float64, device=device), 0, [], []
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()  # the loss in float32 whatever the autocast dtype
        loss = loss_fn(logits, targets)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += loss.detach().double() * len(images)
        count += len(images)
        trues.append(targets.detach())
        preds.append(predict(logits.detach(), label_mode, threshold))
    y_true = torch.cat(trues).cpu().numpy() if trues else np.zeros(0)
    y_pred = torch.cat(preds).cpu().numpy() if preds else np.zeros(0)
    return EpochResult(total.item() / max(count, 1), score(y_true, y_pred, label_mode, n_classes), y_true, y_pred)


def train_one_epoch(model: nn.Module, loader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, label_mode: str, threshold: float, n_classes: int,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> EpochResult:
    """One pass over ``loader`` with optimizer steps; metrics are from the training-mode outputs."""
    model.train()
    return _run(model, loader, loss_fn, device, label_mode, threshold, n_classes, optimizer, amp_dtype, channels_last)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module, device: torch.device,
             label_mode: str, threshold: float, n_classes: int,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> EpochResult:
    """Loss and metrics of ``model`` in eval mode over ``loader``."""
    model.eval()
    return _run(model, loader, loss_fn, device, label_mode, threshold, n_classes, None, amp_dtype, channels_last)


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


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last) for a trial on ``device``.

    ``auto``: bf16 + channels_last on CUDA (tensor cores; NHWC is their native conv layout),
    float32 on CPU, where bf16 autocast is supported but slower on most processors.
    """
    if precision not in PRECISIONS:
        raise KeyError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return None, False
    return torch.bfloat16, cuda


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


def make_loader(index: data_mod.DatasetIndex, split: str, image_size: int, batch_size: int, label_mode: str,
                implies: dict, grayscale: bool = True, train: bool = False, augment: bool = True,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader over one split: shuffled and augmented for training, fixed order otherwise."""
    targets = data_mod.encode_targets(index.labels(split), index.classes, label_mode, implies)
    transform = data_mod.train_transform(image_size, augment) if train else data_mod.eval_transform(image_size)
    dataset = data_mod.ImageDataset(index.paths(split), targets, transform, grayscale)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def default_device(use_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class EpochInterrupted(RuntimeError):
    """``TrainingRun.request_stop()`` was called while an epoch ran; the run is to be abandoned."""


class _Stoppable:
    """A loader whose iteration ends in :class:`EpochInterrupted` once ``event`` is set (checked per batch)."""

    def __init__(self, loader, event: threading.Event) -> None:
        self.loader, self.event = loader, event

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.event.is_set():
                raise EpochInterrupted("training stopped")
            yield batch


class TrainingRun:
    """Model, optimizer, loss and train/validation loaders of one trial, plus its epoch counter.

    ``decoded`` (the decoded cache of this index, :func:`covid_tune.cache.build_decoded_cache`)
    switches the input pipeline from PIL ``DataLoader`` s to device-resident :class:`TensorLoader` s.
    ``pretrained`` (the backbone's state_dict, resolved by the caller) replaces reading ``hp.weights``.
    """

    def __init__(self, hp: HParams, index: data_mod.DatasetIndex, device: torch.device | None = None,
                 decoded: DecodedSplits | None = None, pretrained: dict | None = None) -> None:
        seed_everything(hp.seed)
        self.hp = hp
        self.classes = list(index.classes)
        self.device = device or default_device()
        self.amp_dtype, self.channels_last = resolve_precision(hp.precision, self.device)
        self.model = build_model(hp, len(self.classes), pretrained).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
        self.loss_fn = build_loss(hp.loss, hp.focal_alpha, hp.focal_gamma)
        self.split = split_frozen_prefix(self.model, hp.backbone)
        # the frozen prefix runs without autograd: no activations kept for a backward that never reaches it
        self.forward_model: nn.Module = SplitForward(self.model, self.split) if self.split else self.model
        self.feature_mode = feature_cache_mode(hp.feature_cache, bool(self.split), hp.augment)
        self.feature_bytes = 0  # what the cached prefix outputs take (train + validation), when on
        if self.feature_mode != "off":
            n = len(index.paths("train")) + len(index.paths("validation"))
            self.feature_bytes = n * prefix_output_bytes(self.model, self.split.prefix, hp.image_size, self.device,
                                                         self.amp_dtype)
            if self.feature_bytes > hp.feature_cache_gb * 1e9:
                self.feature_mode = "off"  # over the budget: the prefix runs every step instead
        self.decoded = decoded
        if decoded is None:
            common = dict(image_size=hp.image_size, batch_size=hp.batch_size, label_mode=hp.label_mode,
                          implies=hp.implies, grayscale=hp.grayscale, num_workers=hp.num_workers, seed=hp.seed)
            self.train_loader = make_loader(index, "train", train=True, augment=hp.augment, **common)
            self.val_loader = make_loader(index, "validation", **common)
        else:
            decoded.check(index, hp.image_size, hp.grayscale)
            self.train_loader = self._tensor_loader(index, decoded, "train", train=True)
            self.val_loader = self._tensor_loader(index, decoded, "validation", train=False)
        self._index = index
        self._features: tuple[FeatureLoader, FeatureLoader] | None = None
        self._stop = threading.Event()
        self._digest: list[float] | None = None  # of the frozen part, which never changes: computed once
        self.epoch = 0

    def request_stop(self) -> None:
        """Make an epoch running in another thread end at its next batch (with :class:`EpochInterrupted`)."""
        self._stop.set()

    def _tensor_loader(self, index: data_mod.DatasetIndex, decoded: DecodedSplits, split: str,
                       train: bool) -> TensorLoader:
        hp = self.hp
        targets = data_mod.encode_targets(index.labels(split), index.classes, hp.label_mode, hp.implies)
        return TensorLoader(decoded[split], targets, hp.image_size, hp.batch_size, shuffle=train,
                            augment=train and hp.augment, seed=hp.seed, device=self.device,
                            channels_last=self.channels_last)

    @property
    def modes(self) -> dict[str, int]:
        """Which paths this run takes, as 0/1 numbers for the reported metrics."""
        return {"decoded_cache": int(self.decoded is not None), "feature_cache": int(self.feature_mode != "off"),
                "augmented": int(self.hp.augment and self.feature_mode == "off"),
                "gpu": int(self.device.type == "cuda")}

    def feature_loaders(self) -> tuple[FeatureLoader, FeatureLoader]:
        """Train/validation loaders over the frozen prefix's features, computed on first use.

        Computed from un-augmented images (the evaluation crop) in eval mode, after any
        ``load_state_dict``: the prefix is frozen, so they hold for every epoch of the run.
        """
        if self._features is None:
            hp = self.hp
            if self.decoded is None:
                train_images = make_loader(self._index, "train", hp.image_size, hp.batch_size, hp.label_mode,
                                           hp.implies, grayscale=hp.grayscale, num_workers=hp.num_workers)
            else:
                # the train split already on the device, in order and without augmentation (no second copy)
                train_images = TensorLoader(self.train_loader.images, self.train_loader.targets, hp.image_size,
                                            hp.batch_size, device=self.device, channels_last=self.channels_last)
            args = (self.device, self.amp_dtype, self.channels_last)
            train = extract_features(self.model, self.split.prefix, _Stoppable(train_images, self._stop), *args)
            val = extract_features(self.model, self.split.prefix, _Stoppable(self.val_loader, self._stop), *args)
            self._features = (FeatureLoader(*train, hp.batch_size, shuffle=True, seed=hp.seed),
                              FeatureLoader(*val, hp.batch_size))
        return self._features

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate on validation; returns ``epoch`` and train_/val_ loss, acc, f1."""
        args = (self.device, self.hp.label_mode, self.hp.threshold, len(self.classes))
        fast = dict(amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        if self.feature_mode != "off":
            train_loader, val_loader = self.feature_loaders()
            model: nn.Module = SplitForward(self.model, self.split, from_features=True)
        else:
            train_loader, val_loader, model = self.train_loader, self.val_loader, self.forward_model
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(self.epoch)  # order and augmentation depend on (seed, epoch) only
        elif isinstance(train_loader, DataLoader) and train_loader.generator is not None:
            # the PIL path: reseed the shuffle per epoch too, so a resumed trial sees the same order
            train_loader.generator.set_state(epoch_generator(self.hp.seed, self.epoch, SHUFFLE_STREAM).get_state())
        train = train_one_epoch(model, _Stoppable(train_loader, self._stop), self.loss_fn, self.optimizer, *args,
                                **fast)
        val = evaluate(model, _Stoppable(val_loader, self._stop), self.loss_fn, *args, **fast)
        self.epoch += 1
        return {"epoch": self.epoch, **train.summary("train"), **val.summary("val")}

    def state_dict(self) -> dict:
        """What a checkpoint needs to go on exactly from here: the model's trained part (the frozen part
        is rebuilt by :func:`build_model`), the optimizer state, the epoch, the RNG states."""
        if self._digest is None:
            self._digest = frozen_digest(self.model)
        state = {**model_state(self.model, self._digest), "optimizer": self.optimizer.state_dict(),
                 "epoch": self.epoch, "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # dropout on a GPU draws from the device's generator
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (or a full-model checkpoint of an earlier version)."""
        load_model_state(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        # RNG states must be CPU byte tensors, whatever map_location the checkpoint was loaded with
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
