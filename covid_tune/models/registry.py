"""Model registry: backbones with a replaced head and named freeze levels, and a trial's model step.

``create_model(name, num_classes, freeze=..., weights=...)`` builds any backbone of
:data:`covid_tune.models.backbones.BACKBONES`; the freeze level is applied by
:class:`covid_tune.models.freeze.Classifier` (frozen parameters, frozen BatchNorm kept in eval mode).
:func:`build_trial_model` is the model step of a :class:`~covid_tune.engine.training.TrainingRun`:
seeded build, device and memory format, frozen-prefix split.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covid_tune.engine.files import (
    FROZEN_STORE,
    FROZEN_WEIGHTS,
    MEMBERS_DIR,
    MODEL_META,
    MODEL_WEIGHTS,
    link_or_copy,
    write_atomic,
)
from covid_tune.engine.hparams import HParams, seed_everything
from covid_tune.models.backbones import BACKBONES, Backbone
from covid_tune.models.freeze import Classifier, PrefixSplit, SplitForward, split_stages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FROZEN_META = "frozen_weights"  # model.json: where the frozen layers are ({file, sha256, entries})


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (missing, offline, download failed, wrong file)."""


def backbone_names() -> list[str]:
    """Every registered backbone, sorted."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> Backbone:
    """Look up a backbone; the error lists every valid name."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}") from None


def freeze_level_names(name: str) -> list[str]:
    """The freeze levels ``name`` declares, in the registry's order."""
    return list(get_backbone(name).freeze_levels)


def freeze_label(backbone: str, level: str) -> str:
    """How reports word a freeze level."""
    return get_backbone(backbone).freeze_levels[level].label


# --- building ------------------------------------------------------------------------------

def make_head(in_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    """The course's head: Linear -> ReLU -> Dropout -> Linear, or one Linear when hidden is 0."""
    if hidden <= 0:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def _load_pretrained(net: nn.Module, backbone: str, weights: str | Mapping[str, torch.Tensor]) -> None:
    if isinstance(weights, Mapping):  # resolved and checked by the caller (the sweep's driver)
        state = weights
    elif weights == "none":
        return
    else:  # resolved here, as torchvision would: the cache, else a download (covid_tune.models.weights)
        from covid_tune.models.weights import load_weights

        state = load_weights(backbone, weights)
    net.load_state_dict(state)


def create_model(name: str, num_classes: int, freeze: str = "none",
                 weights: str | Mapping[str, torch.Tensor] = "none",
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


def split_frozen_prefix(model: Classifier, backbone: str) -> PrefixSplit:
    """Split ``model`` (built by :func:`create_model` for ``backbone``) at the end of its frozen prefix.

    Both halves share the model's modules (no copies): training ``rest`` trains the model.
    A backbone without declared ``stages`` gets an empty prefix.
    """
    stages_fn = get_backbone(backbone).stages
    return split_stages(model, stages_fn(model.net) if stages_fn is not None else [("net", model.net)])


# --- the model step of a trial -------------------------------------------------------------

def build_model(hp: HParams, num_classes: int, pretrained: dict | None = None) -> Classifier:
    """A trial's model as it starts training, on the CPU: :func:`create_model` with ``hp``'s weights
    (``pretrained``, the backbone's state_dict resolved by the caller, instead of reading ``hp.weights``),
    right after seeding with ``hp.seed``. The same call gives the same initial state every time, which
    is where a slim checkpoint's frozen layers come from (:mod:`covid_tune.engine.checkpoints`)."""
    seed_everything(hp.seed)
    weights = pretrained if pretrained is not None and hp.weights != "none" else hp.weights
    return create_model(hp.backbone, num_classes, freeze=hp.freeze, weights=weights,
                        head_hidden=hp.head_hidden, dropout=hp.dropout)


@dataclass(frozen=True)
class TrialModel:
    """A trial's model on its device, cut at its frozen prefix.

    ``forward`` runs the prefix without autograd (no activations kept for a backward that never
    reaches it); it is the model itself when nothing is frozen.
    """

    model: Classifier
    split: PrefixSplit
    forward: nn.Module

    def from_features(self) -> SplitForward:
        """The layers after the prefix, fed the prefix's outputs (the feature cache)."""
        return SplitForward(self.model, self.split, from_features=True)


def build_trial_model(hp: HParams, num_classes: int, device: torch.device, channels_last: bool = False,
                      pretrained: dict | None = None) -> TrialModel:
    """:func:`build_model` moved to ``device`` (NHWC when ``channels_last``) and split at its frozen prefix."""
    model = build_model(hp, num_classes, pretrained).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    split = split_frozen_prefix(model, hp.backbone)
    return TrialModel(model, split, SplitForward(model, split) if split else model)


# --- exported best checkpoints -------------------------------------------------------------

class ExportedModelError(ValueError):
    """An exported model folder that cannot be loaded; the message names the file and what is wrong."""


def _serialized(state: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()  # not a path: torch names the archive after the file, and equal parts must be equal bytes
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def save_exported(state_dict: Mapping[str, torch.Tensor], meta: dict, out_dir: Path,
                  frozen: Collection[str] = (), store: Path | None = None) -> None:
    """Write ``model.pt`` and ``model.json`` (how to rebuild and preprocess) into ``out_dir``.

    The entries named in ``frozen`` (layers training never changed) go to ``frozen.pt`` instead, a hard
    link to ``store/<sha256>.pt`` (default ``out_dir/../.frozen``): configurations whose frozen layers are
    equal (same backbone, freeze level and initial weights: ImageNet's, or one seed's) hold them once on
    disk, while each folder stays whole on its own. ``model.json`` names the file and its SHA-256.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frozen_part = {k: v for k, v in state_dict.items() if k in frozen}
    meta = {k: v for k, v in meta.items() if k != FROZEN_META}
    if frozen_part:
        blob = _serialized(frozen_part)
        digest = hashlib.sha256(blob).hexdigest()
        store = Path(store) if store is not None else out_dir.parent / FROZEN_STORE
        shared = store / f"{digest}.pt"
        if not shared.is_file():  # exporters in several processes may write it at once: equal bytes
            store.mkdir(parents=True, exist_ok=True)
            write_atomic(shared, blob)
        link_or_copy(shared, out_dir / FROZEN_WEIGHTS)
        meta[FROZEN_META] = {"file": FROZEN_WEIGHTS, "sha256": digest, "entries": len(frozen_part)}
    else:
        (out_dir / FROZEN_WEIGHTS).unlink(missing_ok=True)
    write_atomic(out_dir / MODEL_WEIGHTS, _serialized({k: v for k, v in state_dict.items() if k not in frozen}))
    # last: an export is complete when model.json names it (export_best keys its reuse on that)
    write_atomic(out_dir / MODEL_META, json.dumps(meta, indent=2, sort_keys=True))


class Ensemble(nn.Module):
    """Several exported models of one configuration as one: the mean of the members' probabilities (softmax
    rows, or sigmoids for multi-label), returned as logits of that mean (``log p``, or ``logit p``), so that
    whatever applies softmax/sigmoid to a model's outputs reads the averaged probabilities."""

    def __init__(self, members: list[nn.Module], label_mode: str = "single") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.label_mode = label_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x).float() for m in self.members]
        if self.label_mode == "single":
            p = torch.stack([o.softmax(1) for o in outs]).mean(0)
            return p.clamp_min(1e-30).log()
        p = torch.stack([o.sigmoid() for o in outs]).mean(0)
        return torch.logit(p.clamp(1e-7, 1 - 1e-7))


def exported_module(meta: dict) -> nn.Module:
    """The untrained module ``model.json`` describes: a :class:`Classifier`, or an :class:`Ensemble` of
    ``meta["ensemble"]["members"]`` of them (the members share backbone and head)."""
    def one() -> Classifier:
        return create_model(meta["backbone"], len(meta["classes"]), freeze=meta["freeze"], weights="none",
                            head_hidden=meta["head_hidden"], dropout=meta["dropout"])

    if "ensemble" in meta:
        return Ensemble([one() for _ in meta["ensemble"]["members"]], meta.get("label_mode", "single"))
    return one()


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise ExportedModelError(f"{path}: no such file (an exported model folder holds {MODEL_WEIGHTS}, {MODEL_META} "
                                 f"and, where layers were frozen, {FROZEN_WEIGHTS}: copy the folder whole)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise ExportedModelError(f"{path}: not a readable PyTorch state_dict, the file may be truncated or damaged "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def exported_state(model_dir: str | Path, meta: dict) -> dict:
    """One exported model's whole state_dict: ``model.pt`` and, where ``model.json`` names it, ``frozen.pt``."""
    model_dir = Path(model_dir)
    state = _read_state(model_dir / MODEL_WEIGHTS)
    if meta.get(FROZEN_META) and isinstance(state, dict):
        frozen = _read_state(model_dir / meta[FROZEN_META]["file"])
        state = {**frozen, **state} if isinstance(frozen, dict) else frozen
    return state


def load_exported(model_dir: str | Path, meta: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model (or an ensemble, :class:`Ensemble`, from its ``members/``) from its folder alone, in
    eval mode. ``meta``: its ``model.json`` when already read. Raises :class:`ExportedModelError`."""
    model_dir = Path(model_dir)
    if meta is None:
        try:
            meta = json.loads((model_dir / MODEL_META).read_text())
        except (OSError, ValueError) as exc:
            raise ExportedModelError(f"{model_dir / MODEL_META}: cannot be read ({exc})") from None
    if "ensemble" in meta and (model_dir / MEMBERS_DIR).is_dir():
        n = len(meta["ensemble"]["members"])
        members = [load_exported(model_dir / MEMBERS_DIR / str(i))[0] for i in range(n)]
        return Ensemble(members, meta.get("label_mode", "single")).eval(), meta
    model = exported_module(meta)  # a single model, or an ensemble written as one model.pt (earlier versions)
    state = exported_state(model_dir, meta)
    try:
        model.load_state_dict(state)
    except Exception as exc:  # RuntimeError: missing/unexpected keys or shapes; TypeError etc.: not a dict
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportedModelError(f"{model_dir / MODEL_WEIGHTS}: does not fit {MODEL_META} ({meta['backbone']}, "
                                 f"{len(meta['classes'])} classes): {first}") from None
    return model.eval(), meta
