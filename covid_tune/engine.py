"""The training engine: plain functions and one small class, no Ray, no YAML.

``TrainingRun(hparams, dataset_index)`` builds model, optimizer, loss and loaders;
``train_one_epoch`` and ``evaluate`` are usable on their own (torchvision references style).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covid_tune import data as data_mod
from covid_tune.losses import build_loss
from covid_tune.metrics import multi_label_metrics, single_label_metrics
from covid_tune.models import create_model


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
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


def _run(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device, label_mode: str,
         threshold: float, n_classes: int, optimizer: torch.optim.Optimizer | None) -> EpochResult:
    total, count, trues, preds = 0.0, 0, [], []
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        loss = loss_fn(logits, targets)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        total += loss.item() * len(images)
        count += len(images)
        trues.append(targets.detach().cpu())
        preds.append(predict(logits.detach(), label_mode, threshold).cpu())
    y_true = torch.cat(trues).numpy() if trues else np.zeros(0)
    y_pred = torch.cat(preds).numpy() if preds else np.zeros(0)
    return EpochResult(total / max(count, 1), score(y_true, y_pred, label_mode, n_classes), y_true, y_pred)


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, label_mode: str, threshold: float, n_classes: int) -> EpochResult:
    """One pass over ``loader`` with optimizer steps; metrics are from the training-mode outputs."""
    model.train()
    return _run(model, loader, loss_fn, device, label_mode, threshold, n_classes, optimizer)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device,
             label_mode: str, threshold: float, n_classes: int) -> EpochResult:
    """Loss and metrics of ``model`` in eval mode over ``loader``."""
    model.eval()
    return _run(model, loader, loss_fn, device, label_mode, threshold, n_classes, None)


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


class TrainingRun:
    """Model, optimizer, loss and train/validation loaders of one trial, plus its epoch counter."""

    def __init__(self, hp: HParams, index: data_mod.DatasetIndex, device: torch.device | None = None) -> None:
        seed_everything(hp.seed)
        self.hp = hp
        self.classes = list(index.classes)
        self.device = device or default_device()
        self.model = create_model(hp.backbone, len(self.classes), freeze=hp.freeze, weights=hp.weights,
                                  head_hidden=hp.head_hidden, dropout=hp.dropout).to(self.device)
        self.optimizer = make_optimizer(self.model, hp.optimizer, hp.lr, hp.momentum, hp.weight_decay)
        self.loss_fn = build_loss(hp.loss, hp.focal_alpha, hp.focal_gamma)
        common = dict(image_size=hp.image_size, batch_size=hp.batch_size, label_mode=hp.label_mode,
                      implies=hp.implies, grayscale=hp.grayscale, num_workers=hp.num_workers, seed=hp.seed)
        self.train_loader = make_loader(index, "train", train=True, augment=hp.augment, **common)
        self.val_loader = make_loader(index, "validation", **common)
        self.epoch = 0

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, evaluate on validation; returns ``epoch`` and train_/val_ loss, acc, f1."""
        args = (self.device, self.hp.label_mode, self.hp.threshold, len(self.classes))
        train = train_one_epoch(self.model, self.train_loader, self.loss_fn, self.optimizer, *args)
        val = evaluate(self.model, self.val_loader, self.loss_fn, *args)
        self.epoch += 1
        return {"epoch": self.epoch, **train.summary("train"), **val.summary("val")}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
