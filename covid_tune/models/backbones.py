"""The backbones the model registry knows: how each is built, where its head and freeze boundaries are.

Each backbone declares its freeze levels as lists of module-name prefixes and its forward pass as an
ordered list of stages (what lets a frozen prefix run under ``no_grad`` or be computed once).
:data:`BACKBONES` is the registry :mod:`covid_tune.models.registry` looks names up in; it is read-only, so
adding a backbone means adding an entry here.
"""

from __future__ import annotations

import re
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
    # torchvision's own key renaming of an old checkpoint (densenet's ``norm.1`` -> ``norm1``); idempotent
    fix_state: Callable[[dict], dict] | None = None


def _torchvision(name: str) -> Callable[[], nn.Module]:
    """A builder of torchvision's ``name`` architecture, untrained: pretrained weights come through the
    registry (the driver's checked copy, shipped to the trials)."""
    def build() -> nn.Module:
        from torchvision.models import get_model  # imported when a model is built: --help stays fast

        return get_model(name, weights=None)
    return build


def _imagenet_v1(name: str) -> Callable[[], object]:
    """torchvision's IMAGENET1K_V1 weights entry of ``name``: the file name and SHA-256 the download checks."""
    def weights() -> object:
        from torchvision.models import get_model_weights

        return get_model_weights(name).IMAGENET1K_V1
    return weights


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
    build=_torchvision("vgg16"),
    head_attr="classifier.6",
    imagenet_weights=_imagenet_v1("vgg16"),
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
    build=_torchvision("resnet18"),
    head_attr="fc",
    imagenet_weights=_imagenet_v1("resnet18"),
    stages=_resnet_stages,
    cam_layer="layer4",
    freeze_levels={
        "fc_only": FreezeLevel("Only FC unfrozen", _RESNET_STEM + ("layer1", "layer2", "layer3", "layer4")),
        "layer1-3": FreezeLevel("Stem + layer1-3 frozen", _RESNET_STEM + ("layer1", "layer2", "layer3")),
        "layer1": FreezeLevel("Stem + layer1 frozen", _RESNET_STEM + ("layer1",)),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)


# same stages as resnet18 (Bottleneck instead of BasicBlock blocks): the same levels, fc of 2048 inputs
RESNET50 = Backbone(
    name="resnet50",
    build=_torchvision("resnet50"),
    head_attr="fc",
    # V1 (76.1% top-1), trained for the Resize(256)+CenterCrop(224) the pipeline uses; V2 expects 232
    imagenet_weights=_imagenet_v1("resnet50"),
    stages=_resnet_stages,
    cam_layer="layer4",
    freeze_levels=dict(RESNET18.freeze_levels),
)


# torchvision.models.densenet._load_state_dict: the published file names ``denselayerN.norm.1.weight``,
# the network ``denselayerN.norm1.weight``
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_fix_state(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _densenet_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    # torchvision DenseNet.forward: features -> relu -> adaptive_avg_pool2d(1) -> flatten(1) -> classifier
    return ([(f"features.{n}", m) for n, m in net.features.named_children()]
            + [("relu", nn.ReLU()), ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
               ("classifier", net.classifier)])


_DENSE_STEM = ("features.conv0", "features.norm0")
DENSENET121 = Backbone(
    name="densenet121",
    build=_torchvision("densenet121"),
    head_attr="classifier",
    imagenet_weights=_imagenet_v1("densenet121"),
    stages=_densenet_stages,
    cam_layer="features.norm5",  # the last BatchNorm (7x7 at 224 px); the ReLU after it is functional
    fix_state=_densenet_fix_state,
    freeze_levels={
        "fc_only": FreezeLevel("Only FC unfrozen", ("features",)),
        "block1-3": FreezeLevel("Stem + dense blocks 1-3 frozen",
                                _DENSE_STEM + tuple(f"features.{k}{i}" for i in (1, 2, 3)
                                                    for k in ("denseblock", "transition"))),
        "block1": FreezeLevel("Stem + dense block 1 frozen", _DENSE_STEM + ("features.denseblock1",
                                                                          "features.transition1")),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)


def _features_then_pool(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return _indexed("features", net.features) + [("avgpool", net.avgpool)]


def _efficientnet_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    # torchvision EfficientNet._forward_impl: features -> avgpool -> flatten(1) -> classifier (Dropout, Linear)
    return _features_then_pool(net) + [("flatten", nn.Flatten(1))] + _indexed("classifier", net.classifier)


# efficientnet_b0.features: 0 stem conv, 1-7 the seven MBConv stages, 8 the 1x1 conv to 1280 channels
EFFICIENTNET_B0 = Backbone(
    name="efficientnet_b0",
    build=_torchvision("efficientnet_b0"),
    head_attr="classifier.1",
    imagenet_weights=_imagenet_v1("efficientnet_b0"),
    stages=_efficientnet_stages,
    cam_layer="features.8",  # the last conv (7x7 at 224 px)
    freeze_levels={
        "fc_only": FreezeLevel("Only FC unfrozen", ("features",)),
        "stage1-5": FreezeLevel("Stem + MBConv stages 1-5 frozen", _range("features", 0, 6)),
        "stage1-3": FreezeLevel("Stem + MBConv stages 1-3 frozen", _range("features", 0, 4)),
        "none": FreezeLevel("Entire network unfrozen", ()),
    },
)


def _convnext_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    # torchvision ConvNeXt._forward_impl: features -> avgpool -> classifier (LayerNorm2d, Flatten, Linear);
    # the Flatten is named "flatten" so a prefix ending there reads as head-only (PrefixSplit.head_only)
    return _features_then_pool(net) + [("classifier.0", net.classifier[0]), ("flatten", net.classifier[1]),
                                       ("classifier.2", net.classifier[2])]


# convnext_tiny.features: 0 stem, 1/3/5/7 stages 1-4 (3, 3, 9, 3 blocks), 2/4/6 the downsamplings before 2-4
CONVNEXT_TINY = Backbone(
    name="convnext_tiny",
    build=_torchvision("convnext_tiny"),
    head_attr="classifier.2",
    imagenet_weights=_imagenet_v1("convnext_tiny"),
    stages=_convnext_stages,
    cam_layer="features.7",  # stage 4 (7x7 at 224 px)
    freeze_levels={
        # the pooled features' LayerNorm belongs to the trunk: fc_only trains the Linear layers only
        "fc_only": FreezeLevel("Only FC unfrozen", ("features", "classifier.0")),
        "stage1-3": FreezeLevel("Stem + stages 1-3 frozen", _range("features", 0, 6)),
        "stage1": FreezeLevel("Stem + stage 1 frozen", _range("features", 0, 2)),
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


BACKBONES: Mapping[str, Backbone] = MappingProxyType({b.name: b for b in (
    VGG16, RESNET18, RESNET50, DENSENET121, EFFICIENTNET_B0, CONVNEXT_TINY, TINY_CNN)})
