"""Loss functions by name: cross-entropy (single-label), BCE and focal loss (multi-label)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

LOSSES = {"ce": "single", "bce": "multi", "focal": "multi"}  # loss name -> label mode it needs
LOSS_LABELS = {"ce": "Cross-entropy", "bce": "BCE", "focal": "Focal"}


class FocalLoss(nn.Module):
    """Mean over elements of alpha_t * (1 - p_t)^gamma * BCE(logit, target) (Lin et al. 2017).

    alpha_t is ``alpha`` for positive targets and ``1 - alpha`` for negatives; ``alpha=None``
    weights every element 1, so ``FocalLoss(None, 0)`` equals BCE-with-logits.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # torchvision's implementation disables alpha weighting for negative alpha
        alpha = -1.0 if self.alpha is None else self.alpha
        return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=self.gamma,
                                  reduction="mean")


def build_loss(name: str, focal_alpha: float | None = 0.25, focal_gamma: float = 2.0) -> nn.Module:
    """Loss module by name; the error lists the valid names."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "focal":
        return FocalLoss(focal_alpha, focal_gamma)
    raise KeyError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
