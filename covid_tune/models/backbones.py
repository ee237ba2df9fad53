"""The backbones the model registry knows: how each is built, where its head and freeze boundaries are.

Each backbone declares its freeze levels as lists of module-name prefixes and its forward pass as an
ordered list of stages (what lets a frozen prefix run under ``no_grad`` or be computed once).
:data:`BACKBONES` is the registry :mod:`covid_tune.models.registry` looks names up in; it is read-only, so
adding a backbone means adding an entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn


@dataclass(frozen=True)
class FreezeLevel:
    """A named set of frozen module prefixes, with the wording used in reports."""

    label: str
    frozen: tuple[str, ...]


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone and where its head and freeze boundaries are."""

    name: str
    build: Callable[[], nn.Module]
    head_attr: str  # dotted path of the final Linear layer that the head replaces
    freeze_levels: dict[str, FreezeLevel]
    imagenet_weights: Callable[[], object] | None = None  # torchvision Weights enum member
    # the network as an ordered list of (dotted name, module) whose composition is its forward;
    # lets a frozen prefix run under no_grad or be computed once
    # (see :func:`covid_tune.models.registry.split_frozen_prefix`)
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]] | None = None
    # the layer whose activations Grad-CAM weighs (the last convolutional stage, at its finest grid)
    cam_layer: str = ""


def _vgg16() -> nn.Module:
    from torchvision.models import vgg16

    return vgg16(weights=None)


def _vgg16_weights():
    from torchvision.models import VGG16_Weights

    return VGG16_Weights.IMAGENET1K_V1


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _resnet18_weights():
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1


def _range(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(start, stop))


def _indexed(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{i}", m) for i, m in enumerate(seq)]


def _vgg_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    # torchvision VGG.forward: features -> avgpool -> flatten(1) -> classifier
    return (_indexed("features", net.features) + [("avgpool", net.avgpool), ("flatten", nn.Flatten(1))]
            + _indexed("classifier", net.classifier))


def _resnet_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    # torchvision ResNet._forward_impl, in order
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    return [(n, getattr(net, n)) for n in names] + [("flatten", nn.Flatten(1)), ("fc", net.fc)]


# vgg16.features blocks: [0:5], [5:10], [10:17], [17:24], [24:31]
VGG16 = Backbone(
    name="vgg16",
    build=_vgg16,
    head_attr="classifier.6",
    imagenet_weights=_vgg16_weights,
    stages=_vgg_stages,
    cam_layer="features.29",  # the last conv block's ReLU, before the final max-pool (14x14 at 224 px)
    freeze_levels={
        "fc_only": FreezeLevel("Only FC layers unfrozen", ("features",)),
        "conv1-3": FreezeLevel("Conv blocks 1-3 frozen", _range("features", 0, 17)),
        "conv1-2": FreezeLevel("Conv blocks 1-2 frozen", _range("features", 0, 10)),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)

_RESNET_STEM = ("conv1", "bn1")
RESNET18 = Backbone(
    name="resnet18",
    build=_resnet18,
    head_attr="fc",
    imagenet_weights=_resnet18_weights,
    stages=_resnet_stages,
    cam_layer="layer4",
    freeze_levels={
        "fc_only": FreezeLevel("Only FC unfrozen", _RESNET_STEM + ("layer1", "layer2", "layer3", "layer4")),
        "layer1-3": FreezeLevel("Stem + layer1-3 frozen", _RESNET_STEM + ("layer1", "layer2", "layer3")),
        "layer1": FreezeLevel("Stem + layer1 frozen", _RESNET_STEM + ("layer1",)),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)


class TinyCNN(nn.Module):
    """A three-block CNN for tests and demos: same interface as the real backbones."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _tiny_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return _indexed("features", net.features) + [("pool", net.pool), ("flatten", nn.Flatten(1)), ("fc", net.fc)]


TINY_CNN = Backbone(
    name="tiny_cnn",
    build=TinyCNN,
    head_attr="fc",
    stages=_tiny_stages,
    cam_layer="features.2.2",  # the last block's ReLU, before its max-pool
    freeze_levels={
        "fc_only": FreezeLevel("Only FC unfrozen", ("features",)),
        "block1": FreezeLevel("Block 1 frozen", ("features.0",)),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)


BACKBONES: Mapping[str, Backbone] = MappingProxyType({b.name: b for b in (VGG16, RESNET18, TINY_CNN)})
