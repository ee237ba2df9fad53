"""Losses: focal loss against its formula, the BCE special case, and the name registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covid_tune.engine.losses import LOSSES, FocalLoss, build_loss


def focal_reference(x: torch.Tensor, y: torch.Tensor, alpha: float | None, gamma: float) -> torch.Tensor:
    """Lin et al. (2017), written out directly in float64."""
    x, y = x.double(), y.double()
    p = 1 / (1 + torch.exp(-x))
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = torch.ones_like(y) if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean()


def batch(seed: int, shape=(6, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    y = (torch.rand(shape, generator=g) > 0.5).float()
    return x, y


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.0), (0.1, 3.5), (None, 2.0),
                                          (None, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_focal_loss_matches_formula(alpha, gamma: float, seed: int) -> None:
    x, y = batch(seed)
    got = FocalLoss(alpha, gamma)(x, y)
    assert got.shape == ()
    assert got.item() == pytest.approx(focal_reference(x, y, alpha, gamma).item(), rel=1e-5, abs=1e-7)


def test_focal_loss_alpha_weighs_positives_and_negatives() -> None:
    x = torch.tensor([[0.3, -0.2]])
    pos, neg = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    # with gamma 0 the loss is alpha_t * BCE: alpha for positives, 1 - alpha for negatives
    bce_pos = nn.BCEWithLogitsLoss()(x, pos).item()
    bce_neg = nn.BCEWithLogitsLoss()(x, neg).item()
    assert FocalLoss(0.2, 0.0)(x, pos).item() == pytest.approx(0.2 * bce_pos, rel=1e-6)
    assert FocalLoss(0.2, 0.0)(x, neg).item() == pytest.approx(0.8 * bce_neg, rel=1e-6)


def test_focal_loss_down_weights_easy_examples() -> None:
    y = torch.tensor([[1.0]])
    easy, hard = torch.tensor([[4.0]]), torch.tensor([[-1.0]])
    ratio_focal = FocalLoss(None, 2.0)(easy, y) / FocalLoss(None, 2.0)(hard, y)
    ratio_bce = nn.BCEWithLogitsLoss()(easy, y) / nn.BCEWithLogitsLoss()(hard, y)
    assert ratio_focal < ratio_bce / 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_without_alpha_and_gamma_is_bce(seed: int) -> None:
    x, y = batch(seed, (8, 4))
    assert torch.allclose(FocalLoss(alpha=None, gamma=0)(x, y), nn.BCEWithLogitsLoss()(x, y), rtol=1e-6, atol=0)


def test_focal_loss_accepts_integer_targets_and_has_gradients() -> None:
    x, y = batch(3)
    x.requires_grad_(True)
    loss_int = FocalLoss(0.25, 2.0)(x, y.long())
    assert loss_int.item() == pytest.approx(FocalLoss(0.25, 2.0)(x, y).item())
    loss_int.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_build_loss_by_name() -> None:
    assert isinstance(build_loss("ce"), nn.CrossEntropyLoss)
    assert isinstance(build_loss("bce"), nn.BCEWithLogitsLoss)
    focal = build_loss("focal", focal_alpha=0.4, focal_gamma=1.5)
    assert isinstance(focal, FocalLoss) and focal.alpha == 0.4 and focal.gamma == 1.5
    assert build_loss("focal", focal_alpha=None).alpha is None
    assert set(LOSSES) == {"ce", "bce", "focal"}
    assert LOSSES == {"ce": "single", "bce": "multi", "focal": "multi"}


def test_build_loss_unknown_name_lists_names() -> None:
    with pytest.raises(KeyError) as info:
        build_loss("mse")
    msg = str(info.value)
    assert "mse" in msg and all(name in msg for name in ("ce", "bce", "focal"))
