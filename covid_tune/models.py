"""Model registry: backbones with a replaced head and named freeze levels.

``create_model(name, num_classes, freeze=..., weights=...)`` builds any registered backbone.
Each backbone declares its freeze levels as lists of module-name prefixes; "frozen" means
``requires_grad=False`` *and* BatchNorm layers inside the frozen part kept in eval mode, so
their running statistics never move (see :class:`Classifier.train`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (missing, offline, download failed, wrong file)."""


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
    # lets a frozen prefix run under no_grad or be computed once (see split_frozen_prefix)
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]] | None = None
    # the layer whose activations Grad-CAM weighs (the last convolutional stage, at its finest grid)
    cam_layer: str = ""


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone to the registry (names are unique)."""
    if backbone.name in _REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    _REGISTRY[backbone.name] = backbone
    return backbone


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """Look up a backbone; the error lists every valid name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}") from None


def freeze_level_names(name: str) -> list[str]:
    return list(get_backbone(name).freeze_levels)


def freeze_label(backbone: str, level: str) -> str:
    return get_backbone(backbone).freeze_levels[level].label


# --- the backbones -------------------------------------------------------------------------

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
register(Backbone(
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
))

_RESNET_STEM = ("conv1", "bn1")
register(Backbone(
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
))


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


register(Backbone(
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
))


# --- building ------------------------------------------------------------------------------

def make_head(in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The course's head: Linear -> ReLU -> Dropout -> Linear, or one Linear when hidden is 0."""
    if hidden <= 0:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
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
            if _under(name, frozen):
                param.requires_grad_(False)
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if mode and self.frozen:
            for name, module in self.net.named_modules():
                if name and _under(name, self.frozen):
                    module.eval()
        return self


def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision's weights API caches this backbone's ImageNet file (TORCH_HOME aware)."""
    weights = get_backbone(backbone).imagenet_weights
    if weights is None:
        raise WeightsUnavailable(f"backbone {backbone!r} has no ImageNet weights; use weights: none")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights().url)


def check_weights(backbone: str, weights: str) -> None:
    """Whether pretrained weights are on disk here, without downloading (a quick pre-flight check)."""
    if weights == "none":
        return
    if weights == "imagenet":
        path = imagenet_weights_file(backbone)
        if not path.is_file():
            url = get_backbone(backbone).imagenet_weights().url
            raise WeightsUnavailable(
                f"ImageNet weights for {backbone} are not on this machine. Place the file {path.name} (from {url}) "
                f"at {path} (set TORCH_HOME to use another cache folder), give a state_dict file as "
                f"trainer.weights, or use trainer.weights=none.")
        return
    if not Path(weights).is_file():
        raise WeightsUnavailable(f"trainer.weights: file {weights} does not exist "
                                 f"(expected a state_dict of the torchvision {backbone} model)")


def _load_pretrained(net: nn.Module, backbone: str, weights: "str | Mapping[str, torch.Tensor]") -> None:
    if isinstance(weights, Mapping):  # resolved and checked by the caller (the sweep's driver)
        state = weights
    elif weights == "none":
        return
    else:  # resolved here, as torchvision would: the cache, else a download (covid_tune.weights)
        from covid_tune.weights import load_weights

        state = load_weights(backbone, weights)
    net.load_state_dict(state)


def create_model(name: str, num_classes: int, freeze: str = "none",
                 weights: "str | Mapping[str, torch.Tensor]" = "none",
                 head_hidden: int = 240, dropout: float = 0.5) -> Classifier:
    """Build a registered backbone, load its weights, replace its head and apply a freeze level.

    ``weights``: ``none``, ``imagenet``, a state_dict file, or the backbone's state_dict itself (what
    a sweep's trials get from the driver, so they never read a file or the network).
    """
    spec = get_backbone(name)
    if freeze not in spec.freeze_levels:
        raise KeyError(f"backbone {name!r} has no freeze level {freeze!r}; "
                       f"choose one of: {', '.join(spec.freeze_levels)}")
    net = spec.build()
    _load_pretrained(net, name, weights)
    parent_name, _, attr = spec.head_attr.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    head = make_head(old.in_features, num_classes, head_hidden, dropout)
    if attr.isdigit():
        parent[int(attr)] = head
    else:
        setattr(parent, attr, head)
    return Classifier(net, spec.freeze_levels[freeze].frozen)


# Parameterless modules whose output does not depend on train/eval mode: safe to fold into a
# frozen prefix that runs without autograd (Dropout is not: it must stay where train() reaches it).
_MODE_FREE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _prefix_eligible(name: str, module: nn.Module, frozen: tuple[str, ...]) -> bool:
    if any(p.requires_grad for p in module.parameters()):
        return False
    if _under(name, frozen):  # frozen by the level: Classifier.train() keeps it in eval mode
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


def split_frozen_prefix(model: Classifier, backbone: str) -> PrefixSplit:
    """Split ``model`` (built by :func:`create_model` for ``backbone``) at the end of its frozen prefix.

    Both halves share the model's modules (no copies): training ``rest`` trains the model.
    A backbone without declared ``stages`` gets an empty prefix.
    """
    stages_fn = get_backbone(backbone).stages
    stages = stages_fn(model.net) if stages_fn is not None else [("net", model.net)]
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

    def train(self, mode: bool = True) -> "SplitForward":
        self.training = mode
        self.model.train(mode)
        return self


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_state(model: Classifier) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that training can change: every parameter and buffer outside
    the frozen prefixes (trainable weights, BatchNorm statistics of the unfrozen part).

    The rest stays exactly as :func:`create_model` built it (``requires_grad=False``, frozen BatchNorm
    kept in eval mode), so a checkpoint needs only this part plus the model's initial state.
    """
    return {k: v for k, v in model.state_dict().items() if not _under(k.removeprefix("net."), model.frozen)}


# --- exported best checkpoints -------------------------------------------------------------

def save_exported(state_dict: dict, meta: dict, out_dir: Path) -> None:
    """Write ``model.pt`` (a plain state_dict) and ``model.json`` (how to rebuild and preprocess)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.pt.tmp"
    torch.save(state_dict, tmp)
    os.replace(tmp, out_dir / "model.pt")
    (out_dir / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_exported(model_dir: str | Path) -> tuple[Classifier, dict]:
    """Rebuild a model from ``model.pt`` + ``model.json`` alone, in eval mode."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    model = create_model(meta["backbone"], len(meta["classes"]), freeze=meta["freeze"], weights="none",
                         head_hidden=meta["head_hidden"], dropout=meta["dropout"])
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta
