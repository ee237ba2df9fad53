"""Sweep specs: YAML -> validated, frozen :class:`Spec`.

Every problem is reported as ``key.path: what is wrong (allowed: ...)`` in one
:class:`SpecError`, before anything starts. Relative paths are resolved against the current
directory.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covid_tune import models, schedule
from covid_tune.losses import LOSSES

TRAINER_AXES = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "head_hidden", "dropout")
METRICS = ("val_acc", "val_f1", "val_loss")


class SpecError(ValueError):
    """The spec cannot be used; the message names each key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(_Section):
    """A generated dataset (written under ``OUTPUT/synthetic-data``) instead of a folder."""

    classes: list[str] = Field(default=["infected", "normal"], min_length=2)
    train: int = Field(60, ge=1, description="images per class in train")
    validation: int = Field(20, ge=1)
    test: int = Field(20, ge=1)
    image_size: int = Field(64, ge=16, le=512)
    seed: int = 0


class DataSpec(_Section):
    root: Optional[str] = None
    synthetic: Optional[SyntheticSpec] = None
    class_map: dict[str, str] = {}
    image_size: int = Field(224, ge=16, le=1024)
    label_mode: Literal["single", "multi"] = "single"
    implies: dict[str, list[str]] = {}
    threshold: float = Field(0.5, gt=0, lt=1)
    on_bad_file: Literal["error", "skip"] = "error"
    grayscale: bool = True
    augment: bool = True
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(True, description="decode + resize every image once into OUTPUT/cache (uint8), "
                                          "augment as tensors on the trial's device; false = PIL DataLoader")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.root is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data.root (a folder) or data.synthetic (generated data)")
        if self.implies and self.label_mode != "multi":
            raise ValueError("data.implies needs data.label_mode: multi")
        return self


def _as_list(value: Any) -> Any:
    return value if value is None or isinstance(value, (list, dict)) else [value]


class GridSpec(_Section):
    """Axes whose product is the trial grid. A scalar is a one-value axis."""

    backbone: list[str] = Field(min_length=1)
    freeze: Union[list[str], dict[str, list[str]]] = ["none"]
    loss: list[str] = Field(default=["ce"], min_length=1)
    seed: list[int] = Field(default=[0], min_length=1)
    # the same bounds as the trainer keys they replace
    optimizer: Optional[list[Literal["sgd", "adam"]]] = None
    lr: Optional[list[Annotated[float, Field(gt=0)]]] = None
    momentum: Optional[list[Annotated[float, Field(ge=0, lt=1)]]] = None
    weight_decay: Optional[list[Annotated[float, Field(ge=0)]]] = None
    batch_size: Optional[list[Annotated[int, Field(ge=1)]]] = None
    head_hidden: Optional[list[Annotated[int, Field(ge=0)]]] = None
    dropout: Optional[list[Annotated[float, Field(ge=0, lt=1)]]] = None

    _wrap = field_validator("*", mode="before")(_as_list)

    @field_validator("*")
    @classmethod
    def _no_repeats(cls, value: Any) -> Any:
        # a repeated value would give two trials the same config id
        lists = value.values() if isinstance(value, dict) else [value] if value is not None else []
        for values in lists:
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ValueError(f"repeated value(s) {repeated}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        return _known(names, models.backbone_names(), "backbone(s)")

    @field_validator("loss")
    @classmethod
    def _known_losses(cls, names: list[str]) -> list[str]:
        return _known(names, list(LOSSES), "loss(es)")


def _known(names: list[str], allowed: list[str], what: str) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown} (allowed: {', '.join(allowed)})")
    return names


class TrainerSpec(_Section):
    epochs: int = Field(24, ge=1, description="max epochs per trial (ASHA's max_t unless scheduler.max_t)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(40, ge=1)
    head_hidden: int = Field(240, ge=0)
    dropout: float = Field(0.5, ge=0, lt=1)
    weights: str = Field("none", description="none | imagenet | path to a torchvision state_dict")
    weights_download: Literal["auto", "never"] = Field(
        "auto", description="auto = download missing ImageNet weights into $TORCH_HOME/hub/checkpoints (on the "
                            "driver, once); never = use only files already there (so does COVID_TUNE_OFFLINE=1)")
    focal_alpha: Optional[float] = Field(0.25, gt=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    feature_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="configurations with a frozen prefix train the layers after it on the prefix's "
                            "outputs, computed once; auto = only where exact (data.augment false), on = also "
                            "with augmentation (outputs of unaugmented images)")
    feature_cache_gb: float = Field(2.0, ge=0, description="the most memory (GB) one trial's cached prefix outputs "
                                                           "may take; over it the prefix runs every step")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast + channels_last on CUDA, float32 on CPU")

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class SchedulerSpec(_Section):
    metric: Literal["val_acc", "val_f1", "val_loss"] = "val_acc"
    mode: Optional[Literal["min", "max"]] = None
    asha: bool = True
    grace_period: Union[int, dict[str, int]] = Field(
        1, description="epochs before ASHA's first cut; or {freeze_level: epochs}, one per freeze level of the grid")
    reduction_factor: float = Field(2.0, gt=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Ray's hedges against cutting late bloomers (ASHAScheduler's own arguments)
    brackets: int = Field(1, ge=1, description="ASHA brackets (>1: asynchronous HyperBand); trials are dealt "
                                               "to brackets at random, bracket s makes its first cut at "
                                               "grace_period * reduction_factor**s")
    max_t: Optional[int] = Field(None, ge=1, description="ASHA's last possible cut (default trainer.epochs); "
                                                         "below it needs stop_last_trials: false")
    stop_last_trials: bool = Field(True, description="false: trials that pass ASHA's last rung (max_t) train on "
                                                     "to trainer.epochs")
    select: Literal["best", "ema", "mean3"] = Field(
        "best", description="best-epoch rule on the metric: raw best, best of an EMA (alpha 0.5) or of a centred "
                            "3-epoch mean; among the kept checkpoints")

    _grace = field_validator("grace_period", mode="before")(lambda v: schedule.parse_grace(v))

    @model_validator(mode="after")
    def _mode_fits_metric(self) -> "SchedulerSpec":
        right = "min" if self.metric == "val_loss" else "max"
        if self.mode is not None and self.mode != right:
            raise ValueError(f"scheduler.mode {self.mode!r} does not fit metric {self.metric!r} (use {right!r})")
        object.__setattr__(self, "mode", right)
        return self


class ResourcesSpec(_Section):
    cpus: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fraction of a GPU must be at most 1 (0.25, 0.5, ...); above 1 use whole GPUs")
        return v


class RaySpec(_Section):
    address: Optional[str] = None
    storage_path: Optional[str] = None
    max_failures: int = Field(0, ge=0)
    max_concurrent: Optional[int] = Field(None, ge=1)


class ShortcutSpec(_Section):
    """Test accuracy with the lung field (a central box) hidden, and with only it kept."""

    enabled: bool = True
    box_width: float = Field(0.6, gt=0, lt=1, description="the central box's share of the crop's width")
    box_height: float = Field(0.7, gt=0, lt=1, description="the central box's share of the crop's height")
    margin: float = Field(0.1, ge=0, lt=1, description="flag a model when the lower end of the 95% interval of "
                                                       "its accuracy with lungs hidden exceeds the "
                                                       "majority-class rate by more than this")


class GradCamSpec(_Section):
    per_class: int = Field(4, ge=0, le=32, description="test images per class shown with their Grad-CAM map "
                                                       "(0 = no Grad-CAM)")
    seed: int = 0


def _on_off(value: Any) -> Any:
    # `shortcut_check: false` (or YAML's bare off) turns the whole check off
    return {"enabled": value} if isinstance(value, bool) else value


class ReportSpec(_Section):
    shortcut_check: ShortcutSpec = ShortcutSpec()
    gradcam: GradCamSpec = GradCamSpec()

    _switch = field_validator("shortcut_check", mode="before")(_on_off)


class Spec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    output: Optional[str] = None
    data: DataSpec
    grid: GridSpec
    trainer: TrainerSpec = TrainerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    ray: RaySpec = RaySpec()
    report: ReportSpec = ReportSpec()

    @model_validator(mode="after")
    def _combinations(self) -> "Spec":
        problems = []
        for b, levels in self.freeze_levels().items():
            if b not in self.grid.backbone:
                problems.append(f"grid.freeze: {b!r} is not in grid.backbone {self.grid.backbone}")
                continue
            allowed = models.freeze_level_names(b)
            for level in levels:
                if level not in allowed:
                    problems.append(f"grid.freeze: backbone {b!r} has no freeze level {level!r} "
                                    f"(allowed for {b}: {', '.join(allowed)})")
        for loss in self.grid.loss:
            if LOSSES[loss] != self.data.label_mode:
                fits = [n for n, m in LOSSES.items() if m == self.data.label_mode]
                problems.append(f"grid.loss: {loss!r} needs data.label_mode {LOSSES[loss]!r}, but it is "
                                f"{self.data.label_mode!r} (allowed with it: {', '.join(fits)})")
        if self.trainer.weights == "imagenet":
            lacking = [b for b in self.grid.backbone if models.get_backbone(b).imagenet_weights is None]
            if lacking:
                problems.append(f"trainer.weights: imagenet is not available for {lacking} (use none or a file)")
        levels = [lv for ls in self.freeze_levels().values() for lv in ls]
        grace = schedule.grace_problems(self.scheduler.grace_period, levels, self.trainer.epochs)
        problems += grace or _asha_problems(self.scheduler, self.trainer.epochs)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def freeze_levels(self) -> dict[str, list[str]]:
        """Freeze levels per backbone (a list applies to every backbone)."""
        f = self.grid.freeze
        if isinstance(f, dict):
            return {b: list(f.get(b, ["none"])) for b in dict.fromkeys(list(self.grid.backbone) + list(f))}
        return {b: list(f) for b in self.grid.backbone}

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}").resolve()

    @property
    def remote_storage(self) -> bool:
        """True when ``ray.storage_path`` is a URI (s3://, gs://, ...) rather than a folder."""
        return "://" in (self.ray.storage_path or "")

    @property
    def storage_root(self) -> str:
        """Where Tune keeps experiments: ``ray.storage_path`` or ``OUTPUT/ray``."""
        return (self.ray.storage_path or str(self.output_dir / "ray")).rstrip("/")

    @property
    def experiment_path(self) -> str:
        """Tune's experiment folder or URI: ``storage_root/name``."""
        return f"{self.storage_root}/{self.name}"

    @property
    def experiment_dir(self) -> Path:
        """A local folder holding the experiment: itself, or the download of a remote one."""
        if self.remote_storage:
            return self.output_dir / "ray-download" / self.name
        return Path(self.experiment_path)


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int, bracket: int = 0) -> list[float]:
    """The epochs at which ASHA's bracket ``bracket`` cuts (Ray's formula), earliest first."""
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) - bracket + 1)
    return [grace_period * reduction_factor ** (k + bracket) for k in range(max(n, 0))]


def _asha_problems(sched: SchedulerSpec, epochs: int) -> list[str]:
    # in ASHA's time units, where a per-level grace is its smallest value (covid_tune.schedule)
    sched = sched.model_copy(update={"grace_period": schedule.min_grace(sched.grace_period)})
    max_t = sched.max_t or epochs
    problems = []
    if max_t > epochs:
        problems.append(f"scheduler.max_t ({max_t}) exceeds trainer.epochs ({epochs}) (allowed: "
                        f"{sched.grace_period}-{epochs})")
        return problems
    if max_t < sched.grace_period:
        problems.append(f"scheduler.max_t ({max_t}) is below scheduler.grace_period ({sched.grace_period})")
        return problems
    if max_t < epochs and sched.stop_last_trials:
        problems.append(f"scheduler.max_t ({max_t}) below trainer.epochs ({epochs}) with stop_last_trials: true "
                        f"would stop every trial at epoch {max_t}; set scheduler.stop_last_trials: false (trials "
                        "that pass the last rung then train to the end) or drop max_t")
    n_rungs = len(asha_rungs(sched.grace_period, sched.reduction_factor, max_t))
    if sched.asha and sched.brackets > max(n_rungs, 1):
        problems.append(f"scheduler.brackets ({sched.brackets}): with grace_period {sched.grace_period}, "
                        f"reduction_factor {sched.reduction_factor:g} and max_t {max_t} ASHA has {n_rungs} rung(s), "
                        f"so a bracket past the {max(n_rungs, 1)}th would never cut (allowed: 1-{max(n_rungs, 1)})")
    return problems


def _allowed_keys(loc: tuple) -> list[str] | None:
    model: Any = Spec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields)


def _error_lines(err: ValidationError, skip: set[tuple] = frozenset()) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("list[", "dict["))))
        if any(loc[: len(s)] == s for s in skip):
            continue
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"{key}: unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            # the spec's combination checks name their keys themselves, "; "-joined
            lines += msg.split("; ") if not loc else [f"{key}: {msg}"]
    return lines


def _drop_bad_keys(raw: dict, err: ValidationError) -> list[tuple]:
    """Remove from ``raw`` each key (inside a section, or an unknown top-level key) that failed
    validation; returns the key paths removed."""
    dropped = []
    for e in err.errors():
        if e["type"] == "missing":
            continue
        path = []
        for part in e["loc"]:
            if not isinstance(part, str) or part.startswith(("list[", "dict[")):
                break
            path.append(part)
        if len(path) < 2 and not (len(path) == 1 and e["type"] == "extra_forbidden"):
            continue  # a whole section's own check, or the top level: nothing smaller to leave out
        node = raw
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            del node[path[-1]]
            dropped.append(tuple(path))
    return dropped


def _all_problems(raw: dict, err: ValidationError) -> list[str]:
    """Every problem of a spec at once: pydantic checks combinations (model validators) only once each
    key of the model is valid, so the bad keys are left out and the rest validated again, until it
    passes or nothing more can be left out. Problems of the keys left out are not reported twice."""
    lines = _error_lines(err)
    trimmed = copy.deepcopy(raw)
    skip: set[tuple] = set()
    for _ in range(5):
        dropped = _drop_bad_keys(trimmed, err)
        if not dropped:
            break
        skip.update(dropped)
        try:
            Spec.model_validate(trimmed)
            break
        except ValidationError as again:
            err = again
            lines += [ln for ln in _error_lines(err, skip) if "required key is missing" not in ln]
    else:
        return list(dict.fromkeys(lines))
    return list(dict.fromkeys(lines + _combination_problems(trimmed)))


def _combination_problems(raw: dict) -> list[str]:
    """Spec-wide combination checks on whatever of each section validates (a section that does not,
    e.g. one failing its own combination check, taken as given): best effort, never raises."""
    sections: dict[str, Any] = {}
    try:
        for name, field in Spec.model_fields.items():
            model, value = field.annotation, raw.get(name)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                if value is not None:
                    sections[name] = value
                continue
            if not isinstance(value, dict):
                if field.is_required():
                    return []
                continue
            try:
                sections[name] = model.model_validate(value)
            except ValidationError:
                sections[name] = model.model_construct(**value)
        Spec.__pydantic_decorators__.model_validators["_combinations"].func(Spec.model_construct(**sections))
    except ValueError as exc:
        return str(exc).split("; ")
    except Exception:  # noqa: BLE001 - values too broken to combine; their own errors are reported
        return []
    return []


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw spec dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. --set trainer.epochs=2")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {key}: cannot parse value {value!r}: {exc}") from None
    return raw


def validate(raw: Any) -> Spec:
    """Validate a raw mapping into a :class:`Spec`, raising :class:`SpecError` on any problem."""
    if not isinstance(raw, dict):
        raise SpecError("invalid spec: the top level must be a mapping with keys "
                        f"{', '.join(Spec.model_fields)}")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError("invalid spec:\n" + "\n".join(f"  {line}" for line in _all_problems(raw, err))) from None
    # absolute paths, so Ray workers with another working directory read the same folders
    update: dict[str, Any] = {"output": str(spec.output_dir)}
    if spec.ray.storage_path and "://" not in spec.ray.storage_path:
        update["ray"] = spec.ray.model_copy(update={"storage_path": str(Path(spec.ray.storage_path).resolve())})
    if spec.data.root is not None:
        update["data"] = spec.data.model_copy(update={"root": str(Path(spec.data.root).resolve())})
    if spec.trainer.weights not in ("none", "imagenet"):
        update["trainer"] = spec.trainer.model_copy(update={"weights": str(Path(spec.trainer.weights).resolve())})
    return spec.model_copy(update=update)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Read a YAML spec, apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {path}: the top level must be a mapping of sections, not {type(raw).__name__}")
    return validate(apply_overrides(raw, overrides or []))
