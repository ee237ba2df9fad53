"""Freezing: a backbone with a frozen part that never moves, and that part cut off as a prefix.

"Frozen" means ``requires_grad=False`` *and* BatchNorm layers inside the frozen part kept in eval
mode, so their running statistics never move (:class:`Classifier`). The frozen prefix of the forward
pass (:func:`split_stages`) runs under ``torch.no_grad()`` (:class:`SplitForward`) or is computed once
(:mod:`covid_tune.engine.features`); only :func:`trained_state` needs to be checkpointed. Knows nothing of
the registry: :func:`covid_tune.models.registry.split_frozen_prefix` hands it a backbone's stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the dotted module name ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Classifier(nn.Module):
    """A backbone with its head replaced and a freeze level applied.

    ``train()`` keeps every module under a frozen prefix in eval mode, so BatchNorm running
    statistics in the frozen part stay exactly as loaded.
    """

    def __init__(self, net: nn.Module, frozen: tuple[str, ...]) -> None:
        super().__init__()
        self.net = net
        self.frozen = frozen
        for name, param in net.named_parameters():
            if under(name, frozen):
                param.requires_grad_(False)
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode and self.frozen:
            for name, module in self.net.named_modules():
                if name and under(name, self.frozen):
                    module.eval()
        return self


# Parameterless modules whose output does not depend on train/eval mode: safe to fold into a
# frozen prefix that runs without autograd (Dropout is not: it must stay where train() reaches it).
_MODE_FREE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _prefix_eligible(name: str, module: nn.Module, frozen: tuple[str, ...]) -> bool:
    if any(p.requires_grad for p in module.parameters()):
        return False
    if under(name, frozen):  # frozen by the level: Classifier.train() keeps it in eval mode
        return True
    return all(isinstance(m, _MODE_FREE + (nn.Sequential,)) for m in module.modules())


@dataclass(frozen=True)
class PrefixSplit:
    """A Classifier cut in two: ``rest(prefix(x)) == model(x)``.

    ``prefix`` holds the leading stages with no trainable parameter and no train-mode behaviour
    (everything frozen, plus parameterless ReLU/pooling/flatten), so its output needs no autograd
    and, for a given input, never changes during training. ``head_only`` means the prefix ends
    with the flatten, i.e. only fully-connected layers are trained (``fc_only``).
    """

    prefix: nn.Sequential
    rest: nn.Sequential
    prefix_names: tuple[str, ...]
    rest_names: tuple[str, ...]

    @property
    def head_only(self) -> bool:
        return "flatten" in self.prefix_names

    def __bool__(self) -> bool:
        return len(self.prefix) > 0


def split_stages(model: Classifier, stages: list[tuple[str, nn.Module]]) -> PrefixSplit:
    """Cut ``model``'s forward, given as ordered ``stages`` (dotted name, module), at the end of its
    frozen prefix. Both halves share the model's modules (no copies): training ``rest`` trains the model."""
    cut = 0
    while cut < len(stages) and _prefix_eligible(stages[cut][0], stages[cut][1], model.frozen):
        cut += 1
    if cut == len(stages):  # nothing trainable at all: keep the last stage as the rest
        cut -= 1
    names = [n for n, _ in stages]
    return PrefixSplit(nn.Sequential(*[m for _, m in stages[:cut]]), nn.Sequential(*[m for _, m in stages[cut:]]),
                       tuple(names[:cut]), tuple(names[cut:]))


class SplitForward(nn.Module):
    """Runs a :class:`Classifier` as ``rest(prefix(x))`` with the frozen prefix under ``torch.no_grad()``.

    Same outputs and same gradients for every trainable parameter as ``model(x)``, without keeping
    the prefix's activations for a backward pass that would never reach them. With
    ``from_features=True`` the input is already the prefix's output (a feature cache) and only
    ``rest`` runs. ``train()``/``eval()`` go through the Classifier, so frozen BatchNorm layers stay in
    eval mode; parameters and ``state_dict`` are the Classifier's.
    """

    def __init__(self, model: Classifier, split: PrefixSplit, from_features: bool = False) -> None:
        super().__init__()
        self.model = model
        self._split = split  # not a submodule: its modules are the model's own
        self.from_features = from_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.from_features:
            with torch.no_grad():
                x = self._split.prefix(x)
        return self._split.rest(x)

    def train(self, mode: bool = True) -> SplitForward:
        self.training = mode
        self.model.train(mode)
        return self


def count_trainable(model: nn.Module) -> int:
    """How many parameters training updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that training can change: every parameter and buffer outside
    the frozen prefixes (trainable weights, BatchNorm statistics of the unfrozen part).

    The rest stays exactly as :func:`covid_tune.models.registry.create_model` built it
    (``requires_grad=False``, frozen BatchNorm kept in eval mode), so a checkpoint needs only this part
    plus the model's initial state.
    """
    return {k: v for k, v in model.state_dict().items() if not under(k.removeprefix("net."), model.frozen)}
