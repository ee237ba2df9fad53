"""The training engine: plain functions and one small class, no Ray, no YAML.

``TrainingRun(hparams, dataset_index)`` builds model, optimizer, loss and loaders;
``train_one_epoch`` and ``evaluate`` are usable on their own (torchvision references style).

Two input pipelines: without a decoded cache, PIL decode + torchvision transforms in a
``DataLoader`` (the course's way); with one (``decoded=``, :mod:`covid_tune.data.cache`), uint8
tensors kept on the trial's device and augmented there (:mod:`covid_tune.data.loaders`). On either,
a frozen prefix of the network runs under ``torch.no_grad()``, and a head-only configuration can
train on features computed once (``feature_cache``). On CUDA, training runs under bf16 autocast
with channels_last (``precision``), and ``compile`` can hand the training forward to ``torch.compile``.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from covid_tune.data import dataset as data_mod
from covid_tune.data.augment import augment_settings
from covid_tune.data.cache import DecodedSplits
from covid_tune.data.folds import fold_view
from covid_tune.data.loaders import FeatureLoader, data_source, set_loader_epoch
from covid_tune.engine.checkpoints import frozen_digest, is_slim, load_model_state, model_state
from covid_tune.engine.features import (
    FeatureStore,
    feature_key,
    feature_loaders,
    plan_feature_cache,
)
from covid_tune.engine.hparams import HParams, seed_everything
from covid_tune.engine.losses import build_loss
from covid_tune.engine.metrics import multi_label_metrics, single_label_metrics
from covid_tune.models.registry import build_model, build_trial_model

PRECISIONS = ("auto", "bf16", "fp32")


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


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
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


LR_SCHEDULES = ("constant", "cosine")


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0) of ``epochs``: ``lr``, or its cosine decay
    ``lr * (1 + cos(pi * epoch / epochs)) / 2`` (torch's CosineAnnealingLR stepped per epoch, eta_min 0).

    A function of the epoch alone, so a trial resumed from a checkpoint continues the same curve."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2
    raise KeyError(f"unknown lr schedule {schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")


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
    logits: np.ndarray | None = None  # float32 outputs, kept by evaluate only (calibration, ROC curves)

    def summary(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.metrics["acc"], f"{prefix}_f1": self.metrics["f1"]}


def _run(model: nn.Module, loader, loss_fn: nn.Module, device: torch.device, label_mode: str,
         threshold: float, n_classes: int, optimizer: torch.optim.Optimizer | None,
         amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> EpochResult:
    # sums stay on the device: one host sync per epoch instead of one per step
    total, count, trues, preds, outs = torch.zeros((), dtype=torch.float64, device=device), 0, [], [], []
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
        if optimizer is None:
            outs.append(logits.detach())
    y_true = torch.cat(trues).cpu().numpy() if trues else np.zeros(0)
    y_pred = torch.cat(preds).cpu().numpy() if preds else np.zeros(0)
    kept = torch.cat(outs).cpu().numpy() if outs else None
    return EpochResult(total.item() / max(count, 1), score(y_true, y_pred, label_mode, n_classes), y_true, y_pred,
                       kept)


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


COMPILE_MODES = ("auto", "on", "off")
# auto compiles only trials at least this long: compiling a ResNet's forward and backward takes tens of
# seconds, which a short trial does not earn back (a guess to check on a GPU, see README's benchmarks)
COMPILE_MIN_STEPS = 2000


def resolve_compile(mode: str, device: torch.device, feature_mode: str, steps: int) -> bool:
    """Whether a trial runs its training forward through ``torch.compile``.

    ``auto``: on CUDA only, where the network runs every step (no feature cache: a head on cached
    features is too small to gain) and the trial trains at least :data:`COMPILE_MIN_STEPS` steps; on a
    CPU compiling takes minutes on few cores for little gain. ``on`` / ``off``: always / never.
    """
    if mode not in COMPILE_MODES:
        raise KeyError(f"unknown compile mode {mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode == "on"
    return device.type == "cuda" and feature_mode == "off" and steps >= COMPILE_MIN_STEPS


def default_device(use_gpu: bool = True) -> torch.device:
    """CUDA when asked for and present, else the CPU."""
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

    Composed of steps each module owns, run in this order: precision (:func:`resolve_precision`),
    the model (:func:`covid_tune.models.registry.build_trial_model`), the feature-cache plan
    (:func:`covid_tune.engine.features.plan_feature_cache`), the data source
    (:func:`covid_tune.data.loaders.data_source`).
    ``decoded`` (the decoded cache of this index, :func:`covid_tune.data.cache.build_decoded_cache`)
    switches the input pipeline from PIL ``DataLoader`` s to device-resident :class:`TensorLoader` s.
    ``pretrained`` (the backbone's state_dict, resolved by the caller) replaces reading ``hp.weights``.
    ``features`` (a :class:`~covid_tune.engine.features.FeatureStore`) shares the feature cache with other
    runs of the same frozen prefix and inputs (:meth:`feature_key`); without it the run computes its own.
    """

    def __init__(self, hp: HParams, index: data_mod.DatasetIndex, device: torch.device | None = None,
                 decoded: DecodedSplits | None = None, pretrained: dict | None = None,
                 features: FeatureStore | None = None) -> None:
        seed_everything(hp.seed)
        if hp.fold is not None:  # data.folds: train on the other folds, validate on this one
            index, decoded = fold_view(index, decoded, hp.fold)
        self.hp = hp
        self.classes = list(index.classes)
        self.device = device or default_device()
        self.amp_dtype, self.channels_last = resolve_precision(hp.precision, self.device)
        self.net = build_trial_model(hp, len(self.classes), self.device, self.channels_last, pretrained)
        self.model, self.split, self.forward_model = self.net.model, self.net.split, self.net.forward
        self.optimizer = make_optimizer(self.model, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
        self.loss_fn = build_loss(hp.loss, hp.focal_alpha, hp.focal_gamma)
        n_images = len(index.paths("train")) + len(index.paths("validation"))
        plan = plan_feature_cache(hp, self.model, self.split, n_images, self.device, self.amp_dtype)
        self.feature_mode, self.feature_bytes = plan.mode, plan.bytes
        self.decoded = decoded
        self.data = data_source(hp, index, self.device, decoded, self.channels_last)
        self.train_loader, self.val_loader = self.data.train, self.data.validation
        self._features: tuple[FeatureLoader, FeatureLoader] | None = None
        self._head = self.net.from_features() if self.feature_mode != "off" else None
        steps = hp.epochs * math.ceil(len(index.paths("train")) / hp.batch_size)
        self.compiled = resolve_compile(hp.compile, self.device, self.feature_mode, steps)
        if self.compiled:
            # in place (nn.Module.compile): the module, its parameters and state_dict keys stay the same;
            # compiled on the first batch, then reused by every epoch (train and eval: one graph each)
            (self._head or self.forward_model).compile()
        self.store = features
        self._stop = threading.Event()
        self._digest: list[float] | None = None  # of the frozen part, which never changes: computed once
        self.epoch = 0

    def request_stop(self) -> None:
        """Make an epoch running in another thread end at its next batch (with :class:`EpochInterrupted`)."""
        self._stop.set()

    MODE_KEYS = ("decoded_cache", "feature_cache", "augmented", "gpu", "compiled")

    @property
    def modes(self) -> dict[str, int]:
        """Which paths this run takes, as 0/1 numbers for the reported metrics."""
        return dict(zip(self.MODE_KEYS, (int(self.decoded is not None), int(self.feature_mode != "off"),
                                          int(augment_settings(self.hp.augment) is not None
                                              and self.feature_mode == "off"),
                                          int(self.device.type == "cuda"), int(self.compiled))))

    def feature_loaders(self) -> tuple[FeatureLoader, FeatureLoader]:
        """Train/validation loaders over the frozen prefix's features, computed on first use.

        Computed from un-augmented images (the evaluation crop) in eval mode, after any
        ``load_state_dict``: the prefix is frozen, so they hold for every epoch of the run.
        """
        if self._features is None:
            train, val = _Stoppable(self.data.train_in_order(), self._stop), _Stoppable(self.val_loader, self._stop)
            self._features = feature_loaders(self.model, self.split, train, val, self.hp.batch_size, self.hp.seed,
                                             self.device, self.amp_dtype, self.channels_last, store=self.store,
                                             key=self.feature_key() if self.store is not None else "")
        return self._features

    def feature_key(self) -> str:
        """The key of this run's prefix outputs in a :class:`~covid_tune.engine.features.FeatureStore`."""
        return feature_key(self.split.prefix, self.data.identity(), self.amp_dtype, self.channels_last,
                           self.device, self.hp.batch_size)

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate on validation; returns ``epoch`` and train_/val_ loss, acc, f1."""
        args = (self.device, self.hp.label_mode, self.hp.threshold, len(self.classes))
        fast = dict(amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        if self.feature_mode != "off":
            train_loader, val_loader = self.feature_loaders()
            model = self._head
        else:
            train_loader, val_loader, model = self.train_loader, self.val_loader, self.forward_model
        set_loader_epoch(train_loader, self.hp.seed, self.epoch)  # order and augmentation: (seed, epoch) only
        for group in self.optimizer.param_groups:
            group["lr"] = epoch_lr(self.hp.lr, self.hp.lr_schedule, self.epoch, self.hp.epochs)
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
        """Resume from :meth:`state_dict` (or a full-model checkpoint of an earlier version); a finished
        trial's state (:func:`~covid_tune.engine.checkpoints.finished_state`) sets the weights and epoch only."""
        load_model_state(self.model, state)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        # RNG states must be CPU byte tensors, whatever map_location the checkpoint was loaded with
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
