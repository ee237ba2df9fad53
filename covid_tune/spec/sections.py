"""The sections of a sweep spec (data, grid, trainer, scheduler, resources, ray, report, tracking) as frozen
pydantic models, each checking its own keys; :mod:`covid_tune.spec.load` puts them together, checks what
spans sections and loads YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from covid_tune.engine import schedule
from covid_tune.engine.files import MLFLOW_FOLDER
from covid_tune.engine.losses import LOSSES
from covid_tune.models import registry as models

TRAINER_AXES = ("optimizer", "lr", "lr_schedule", "momentum", "weight_decay", "batch_size", "head_hidden", "dropout")
SWEPT_AXES = TRAINER_AXES + ("augment",)  # every axis a grid may list or sample besides backbone/freeze/loss/seed
METRICS = ("val_acc", "val_f1", "val_loss")


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true/false as 1/0 wherever a number is expected (`resources.cpus=true`)
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


# every number of a spec: like int/float, but a YAML true/false is refused instead of read as 1/0
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSpec(Section):
    """A generated dataset (written under ``OUTPUT/synthetic-data``) instead of a folder."""

    classes: list[str] = Field(default=["infected", "normal"], min_length=2)
    train: Int = Field(60, ge=1, description="images per class in train")
    validation: Int = Field(20, ge=1)
    test: Int = Field(20, ge=1)
    image_size: Int = Field(64, ge=16, le=512)
    seed: Int = 0


class ColumnsSpec(Section):
    """Which columns of ``data.labels`` hold what."""

    path: str = Field(description="the image's path, relative to data.root (else to the CSV's folder)")
    label: str | None = Field(None, description="one label per row (single-label), or several joined by "
                                                "separator (multi-label)")
    labels: list[str] | None = Field(None, min_length=2, description="0/1 columns, one per class (multi-label)")
    separator: str | None = Field(None, min_length=1, description="with label: the character between labels "
                                                                  "(NIH's Finding Labels: '|')")
    patient: str | None = Field(None, description="the patient id: a patient's images stay in one split")
    split: str | None = Field(None, description="train/validation/test per row; else split by patient with "
                                                "data.splits")
    classes: list[str] | None = Field(None, min_length=2, description="the allowed values of label; a row with "
                                                                       "another is refused")

    @model_validator(mode="after")
    def _one_label_source(self) -> ColumnsSpec:
        if (self.label is None) == (self.labels is None):
            raise ValueError("give exactly one of data.columns.label (a label column) or data.columns.labels "
                             "(0/1 columns, one per class)")
        if self.separator is not None and self.label is None:
            raise ValueError("data.columns.separator goes with data.columns.label, not labels")
        if self.classes is not None and self.label is None:
            raise ValueError("data.columns.classes goes with data.columns.label (labels names its classes)")
        return self

    @property
    def multi(self) -> bool:
        return self.labels is not None or self.separator is not None


class SplitFractions(Section):
    """How a label table without a split column is split by patient."""

    train: Float = Field(0.7, gt=0, lt=1)
    validation: Float = Field(0.15, gt=0, lt=1)
    test: Float = Field(0.15, gt=0, lt=1)
    seed: Int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"data.splits: train + validation + test must be 1, got {total:g}")
        return self


AUGMENT_PRESETS = ("none", "light", "course")
# the branch names of the spec's tagged unions: pydantic puts them into an error's location, messages leave them out
UNION_TAGS = ("[preset]", "[mapping]", "[list]", "[distribution]")


class AugmentSpec(Section):
    """A custom training augmentation (the batched pipeline's settings); a key left out does nothing."""

    rotation: Float = Field(0.0, ge=0, le=180, description="random rotation within +-degrees")
    scale: tuple[Float, Float] = Field((1.0, 1.0), description="RandomResizedCrop's area fraction [lo, hi]")
    ratio: tuple[Float, Float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop's aspect ratio [lo, hi]")
    flip: bool = Field(False, description="random horizontal flip")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"[{v[0]:g}, {v[1]:g}]: need 0 < lo <= hi <= 1 (a share of the image's area)")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"[{v[0]:g}, {v[1]:g}]: need 0 < lo <= hi (width / height)")
        return v


def _augment_value(value: Any) -> Any:
    # true/false from before the presets; one message for anything that is neither a preset nor a mapping
    if isinstance(value, bool):
        return "course" if value else "none"
    if isinstance(value, str) and value not in AUGMENT_PRESETS or not isinstance(value, (str, dict, AugmentSpec)):
        raise ValueError(f"{value!r} is not an augmentation (allowed: {', '.join(AUGMENT_PRESETS)}, true (course), "
                         "false (none) or a mapping of rotation, scale, ratio, flip)")
    return value


# a preset's name or a custom mapping; the discriminator keeps pydantic to the one form given (one message)
Augment = Annotated[
    Annotated[Literal["none", "light", "course"], Tag(UNION_TAGS[0])] | Annotated[AugmentSpec, Tag(UNION_TAGS[1])],
    Discriminator(lambda v: UNION_TAGS[0] if isinstance(v, str) else UNION_TAGS[1]),
    BeforeValidator(_augment_value),
]


def augment_value(value: str | AugmentSpec) -> str | dict:
    """A spec's augmentation as a trial carries it (a preset's name or a plain mapping)."""
    return value if isinstance(value, str) else value.model_dump(mode="json")


class DataSpec(Section):
    root: str | None = None
    labels: str | None = Field(None, description="a CSV of labels (data.columns says which column is what); "
                                                 "image paths relative to data.root, else to the CSV's folder")
    columns: ColumnsSpec | None = None
    splits: SplitFractions = Field(SplitFractions(), description="fractions and seed of the split by patient "
                                                                 "of a label table without a split column")
    synthetic: SyntheticSpec | None = None
    class_map: dict[str, str] = {}
    image_size: Int = Field(224, ge=16, le=1024)
    label_mode: Literal["single", "multi"] = "single"
    implies: dict[str, list[str]] = {}
    threshold: Float = Field(0.5, gt=0, lt=1)
    on_bad_file: Literal["error", "skip"] = "error"
    on_duplicate: Literal["warn", "error", "drop"] = Field(
        "warn", description="an image of validation or test whose decoded pixels equal one of an earlier split: "
                            "warn (kept, named in the console and REPORT.md), error (refused before training), "
                            "drop (removed from the later split)")
    grayscale: bool = True
    augment: Augment = Field("course", description="training augmentation: none | light (rotation 15, crop scale "
                                                    "0.7-1, flip) | course (rotation 30, crop scale 0.08-1, flip) | "
                                                    "{rotation, scale, ratio, flip}; true = course, false = none")
    num_workers: Int = Field(0, ge=0)
    cache: bool = Field(True, description="decode + resize every image once into OUTPUT/cache (uint8), "
                                          "augment as tensors on the trial's device; false = PIL DataLoader")
    folds: Int | None = Field(None, ge=2, description="grouped cross-validation: train and validation pooled and "
                                                     "cut into this many folds by data.group_by; each configuration "
                                                     "x seed x fold is a trial; test is never in a fold")
    group_by: str | None = Field(None, description="with data.folds, what a group (never split) is: a column of "
                                                   "ROOT/manifest.csv (e.g. patient_group), re:PATTERN on the file "
                                                   "name (first capturing group, else the match), or none")
    fold_seed: Int = Field(0, description="the seed of the shuffled StratifiedGroupKFold")

    @field_validator("group_by")
    @classmethod
    def _group_by_form(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("re:"):
            import re

            try:
                re.compile(value[3:])
            except re.error as exc:
                raise ValueError(f"{value!r}: the regular expression does not compile ({exc}); allowed: a "
                                 "manifest column, re:PATTERN or none") from None
        elif value is not None and not value.strip():
            raise ValueError("empty; allowed: a column of ROOT/manifest.csv, re:PATTERN or none")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.synthetic is not None and (self.root is not None or self.labels is not None):
            raise ValueError("give data.root (a folder), data.labels (a CSV) or data.synthetic (generated "
                             "data), not synthetic with another")
        if self.root is None and self.synthetic is None and self.labels is None:
            raise ValueError("give exactly one of data.root (a folder) or data.synthetic (generated data), "
                             "or data.labels (a CSV of labels)")
        if (self.labels is None) != (self.columns is None):
            raise ValueError("data.labels (a CSV) and data.columns (which column is what) go together")
        if self.columns is not None and self.columns.multi and self.label_mode != "multi":
            raise ValueError("data.columns with labels or a separator is multi-label: set data.label_mode: multi")
        if self.folds is not None and self.group_by is None:
            raise ValueError("data.folds needs data.group_by: a column of ROOT/manifest.csv (e.g. patient_group), "
                             "re:PATTERN on the file name, or none (each image its own group)")
        if self.group_by is not None and self.folds is None:
            raise ValueError("data.group_by goes with data.folds (the number of cross-validation folds, at least 2)")
        if self.implies and self.label_mode != "multi":
            raise ValueError("data.implies needs data.label_mode: multi")
        if self.synthetic is not None and len({self.class_map.get(c, c) for c in self.synthetic.classes}) < 2:
            raise ValueError(f"data.class_map merges every class of data.synthetic.classes {self.synthetic.classes} "
                             "into one; a classifier needs at least two classes")
        return self


def _as_list(value: Any) -> Any:
    return value if value is None or isinstance(value, (list, dict, BaseModel)) else [value]


DISTRIBUTIONS = ("loguniform", "uniform", "choice")


class Distribution(Section):
    """A grid axis sampled instead of listed: exactly one of ``loguniform: [lo, hi]``, ``uniform: [lo, hi]``,
    ``choice: [values]`` (search.algorithm random or optuna draws search.samples settings per grid cell)."""

    loguniform: tuple[Float, Float] | None = None
    uniform: tuple[Float, Float] | None = None
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, raw: Any) -> Any:
        # one message for a kind that does not exist or several kinds, instead of pydantic's per-key ones
        if isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if v is not None}  # a dumped spec lists the kinds not given as null
            unknown = [k for k in raw if k not in DISTRIBUTIONS]
            if unknown or len(raw) != 1:
                what = f"unknown distribution {unknown[0]!r}" if unknown else f"{len(raw)} distributions given"
                raise ValueError(f"{what} (allowed: exactly one of {', '.join(DISTRIBUTIONS)}, e.g. "
                                 "{loguniform: [1.0e-4, 1.0e-2]})")
        return raw

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is None:
                continue
            lo, hi = bounds
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform [{lo:g}, {hi:g}]: a log scale needs low > 0")
            if lo >= hi:
                raise ValueError(f"{kind} [{lo:g}, {hi:g}]: low must be below high")
        if self.choice is not None:
            repeated = sorted({str(v) for v in self.choice if self.choice.count(v) > 1})
            if repeated:
                raise ValueError(f"choice: repeated value(s) {repeated}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def args(self) -> list:
        return list(getattr(self, self.kind))

    def text(self) -> str:
        """``loguniform[0.0001, 0.01]``, as the dry run and the report show it."""
        return f"{self.kind}[{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in self.args)}]"


def _axis(item: Any) -> Any:
    """A grid axis: a list of ``item`` values, or a :class:`Distribution` (tagged: one message per problem)."""
    return Annotated[
        Annotated[list[item], Tag(UNION_TAGS[2])] | Annotated[Distribution, Tag(UNION_TAGS[3])],
        Discriminator(lambda v: UNION_TAGS[3] if isinstance(v, (dict, Distribution)) else UNION_TAGS[2]),
    ] | None


class SearchSpec(Section):
    """How the distributions of the grid are searched; the listed axes stay a full grid."""

    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid = lists only; random = independent draws per grid cell (seeded); optuna = "
                            "Optuna's TPE (Ray Tune's OptunaSearch), one search per grid cell")
    samples: Int = Field(1, ge=1, description="settings drawn per grid cell (each trained once per grid.seed)")
    seed: Int = Field(0, description="the draws' seed: the same seed draws the same settings (random) or "
                                     "seeds TPE's sampler (optuna)")


# each grid axis's item type (the bounds of the trainer key it replaces); a distribution's values obey it too
AXIS_ITEMS: dict[str, Any] = {
    "optimizer": Literal["sgd", "adam"],
    "lr": Annotated[Float, Field(gt=0)],
    "lr_schedule": Literal["constant", "cosine"],
    "momentum": Annotated[Float, Field(ge=0, lt=1)],
    "weight_decay": Annotated[Float, Field(ge=0)],
    "batch_size": Annotated[Int, Field(ge=1)],
    "head_hidden": Annotated[Int, Field(ge=0)],
    "dropout": Annotated[Float, Field(ge=0, lt=1)],
    "augment": Augment,
}
CATEGORICAL_AXES = ("optimizer", "lr_schedule", "augment")
INTEGER_AXES = ("batch_size", "head_hidden")


class GridSpec(Section):
    """Axes whose product is the trial grid. A scalar is a one-value axis."""

    backbone: list[str] = Field(min_length=1)
    freeze: list[str] | dict[str, list[str]] = ["none"]
    loss: list[str] = Field(default=["ce"], min_length=1)
    seed: list[Int] = Field(default=[0], min_length=1)
    # the same bounds as the trainer keys they replace; each a list or a distribution (SearchSpec)
    optimizer: _axis(AXIS_ITEMS["optimizer"]) = None
    lr: _axis(AXIS_ITEMS["lr"]) = None
    lr_schedule: _axis(AXIS_ITEMS["lr_schedule"]) = None
    momentum: _axis(AXIS_ITEMS["momentum"]) = None
    weight_decay: _axis(AXIS_ITEMS["weight_decay"]) = None
    batch_size: _axis(AXIS_ITEMS["batch_size"]) = None
    head_hidden: _axis(AXIS_ITEMS["head_hidden"]) = None
    dropout: _axis(AXIS_ITEMS["dropout"]) = None
    augment: _axis(AXIS_ITEMS["augment"]) = None  # data.augment's values, one grid axis

    _wrap = field_validator("*", mode="before")(_as_list)

    @field_validator("*")
    @classmethod
    def _no_repeats(cls, value: Any) -> Any:
        # a repeated value would give two trials the same config id
        if isinstance(value, Distribution):
            return value
        lists = value.values() if isinstance(value, dict) else [value] if value is not None else []
        for values in lists:
            repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
            if repeated:
                raise ValueError(f"repeated value(s) {repeated}")
        return value

    @field_validator(*AXIS_ITEMS)
    @classmethod
    def _distribution_values(cls, dist: Any, info: ValidationInfo) -> Any:
        # a distribution's bounds and choices obey the axis's own bounds; only numbers are drawn from ranges
        axis = info.field_name
        if not isinstance(dist, Distribution):
            return dist
        if dist.kind != "choice" and axis in CATEGORICAL_AXES:
            raise ValueError(f"{dist.kind} draws numbers; {axis} takes choice: [...]")
        if axis == "augment" and any(v not in AUGMENT_PRESETS for v in dist.args):
            raise ValueError(f"choice draws among preset names (allowed: {', '.join(AUGMENT_PRESETS)}); list "
                             "custom mappings as a grid axis instead")
        try:
            TypeAdapter(list[AXIS_ITEMS[axis]]).validate_python(dist.args)
        except ValidationError as err:
            msgs = sorted({e["msg"].removeprefix("Value error, ") for e in err.errors()})
            raise ValueError(f"{dist.text()}: {'; '.join(msgs)}") from None
        return dist

    def distributions(self) -> dict[str, Distribution]:
        """The sampled axes, in the order of :data:`SWEPT_AXES`."""
        return {a: getattr(self, a) for a in SWEPT_AXES if isinstance(getattr(self, a), Distribution)}

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


class TrainerSpec(Section):
    epochs: Int = Field(24, ge=1, description="max epochs per trial (ASHA's max_t unless scheduler.max_t)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: epoch e (from 0) trains at lr * (1 + cos(pi * e / epochs)) / 2, so the "
                                "last epochs change the weights little and their validation scores settle")
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    batch_size: Int = Field(40, ge=1)
    head_hidden: Int = Field(240, ge=0)
    dropout: Float = Field(0.5, ge=0, lt=1)
    weights: str = Field("none", description="none | imagenet | path to a torchvision state_dict")
    weights_download: Literal["auto", "never"] = Field(
        "auto", description="auto = download missing ImageNet weights into $TORCH_HOME/hub/checkpoints (on the "
                            "driver, once); never = use only files already there (so does COVID_TUNE_OFFLINE=1)")
    focal_alpha: Float | None = Field(0.25, gt=0, lt=1)
    focal_gamma: Float = Field(2.0, ge=0)
    feature_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="configurations with a frozen prefix train the layers after it on the prefix's "
                            "outputs, computed once; auto = only where exact (data.augment false), on = also "
                            "with augmentation (outputs of unaugmented images)")
    feature_cache_gb: Float = Field(2.0, ge=0, description="the most memory (GB) one trial's cached prefix outputs "
                                                           "may take; over it the prefix runs every step")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast + channels_last on CUDA, float32 on CPU")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the training forward (once per process, reused by every epoch); "
                            "auto = on CUDA for trials of at least 2,000 steps whose network runs every step, "
                            "off on CPU")

    @field_validator("feature_cache", "compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class SchedulerSpec(Section):
    metric: Literal["val_acc", "val_f1", "val_loss"] = "val_acc"
    mode: Literal["min", "max"] | None = None
    asha: bool = True
    grace_period: Int | dict[str, Int] = Field(
        1, description="epochs before ASHA's first cut; or {freeze_level: epochs}, one per freeze level of the grid")
    reduction_factor: Float = Field(2.0, gt=1)
    keep_checkpoints: Int = Field(1, ge=1, description="latest checkpoints kept per trial (each with the "
                                                     "optimizer state, for resume); the selected epoch's "
                                                     "weights are kept besides, in the latest")
    # Ray's hedges against cutting late bloomers (ASHAScheduler's own arguments)
    brackets: Int = Field(1, ge=1, description="ASHA brackets (>1: asynchronous HyperBand); trials are dealt "
                                               "to brackets at random, bracket s makes its first cut at "
                                               "grace_period * reduction_factor**s")
    max_t: Int | None = Field(None, ge=1, description="ASHA's last possible cut (default trainer.epochs); "
                                                         "below it needs stop_last_trials: false")
    stop_last_trials: bool = Field(True, description="false: trials that pass ASHA's last rung (max_t) train on "
                                                     "to trainer.epochs")
    select: Literal["best", "ema", "mean3"] = Field(
        "best", description="best-epoch rule on the metric: raw best, best of an EMA (alpha 0.5) or of a centred "
                            "3-epoch mean")

    _grace = field_validator("grace_period", mode="before")(lambda v: schedule.parse_grace(v))

    @model_validator(mode="after")
    def _mode_fits_metric(self) -> SchedulerSpec:
        right = "min" if self.metric == "val_loss" else "max"
        if self.mode is not None and self.mode != right:
            raise ValueError(f"scheduler.mode {self.mode!r} does not fit metric {self.metric!r} (use {right!r})")
        object.__setattr__(self, "mode", right)
        return self


class ResourcesSpec(Section):
    cpus: Float = Field(1.0, gt=0)
    gpu: Float = Field(0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fraction of a GPU must be at most 1 (0.25, 0.5, ...); above 1 use whole GPUs")
        return v


class RaySpec(Section):
    address: str | None = None
    storage_path: str | None = None
    max_failures: Int = Field(0, ge=0)
    max_concurrent: Int | None = Field(None, ge=1)


class ShortcutSpec(Section):
    """Test accuracy with the lung field (a central box) hidden, and with only it kept."""

    enabled: bool = True
    box_width: Float = Field(0.6, gt=0, lt=1, description="the central box's share of the crop's width")
    box_height: Float = Field(0.7, gt=0, lt=1, description="the central box's share of the crop's height")
    margin: Float = Field(0.1, ge=0, lt=1, description="flag a model when the lower end of the 95% interval of "
                                                       "its accuracy with lungs hidden exceeds the "
                                                       "majority-class rate by more than this")


class GradCamSpec(Section):
    per_class: Int = Field(4, ge=0, le=32, description="test images per class shown with their Grad-CAM map "
                                                       "(0 = no Grad-CAM)")
    seed: Int = 0


def _on_off(value: Any) -> Any:
    # `shortcut_check: false` (or YAML's bare off) turns the whole check off
    return {"enabled": value} if isinstance(value, bool) else value


def check_rule(rule: str) -> str:
    """``youden``, ``sensitivity=X``, ``specificity=X`` (X in (0, 1)) or a fixed threshold in (0, 1);
    raises ValueError naming the allowed forms."""
    allowed = "youden, sensitivity=X, specificity=X (X between 0 and 1) or a fixed threshold such as 0.5"
    text = str(rule).strip()
    if text == "youden":
        return text
    head, _, number = text.rpartition("=")
    if head not in ("", "sensitivity", "specificity"):
        raise ValueError(f"{rule!r} is not an operating point (allowed: {allowed})")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{rule!r} is not an operating point (allowed: {allowed})") from None
    if not 0 < value < 1:
        raise ValueError(f"{rule!r}: the number must lie between 0 and 1 (allowed: {allowed})")
    return f"{head}={value:g}" if head else f"{value:g}"


def _operating_point(value: Any) -> Any:
    # YAML reads a bare 0.5 as a number; the rule is kept as text
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an operating point (allowed: youden, sensitivity=X, specificity=X "
                         "(X between 0 and 1) or a fixed threshold such as 0.5)")
    return check_rule(str(value)) if isinstance(value, (str, int, float)) else value


class ReportSpec(Section):
    shortcut_check: ShortcutSpec = ShortcutSpec()
    gradcam: GradCamSpec = GradCamSpec()
    positive: str | None = Field(None, description="single-label: the class ROC AUC, sensitivity and the operating "
                                                   "point are about (default: the first class not named normal, "
                                                   "else the first)")
    operating_point: str = Field("youden", description="the threshold on the positive class's calibrated "
                                                       "probability, chosen on validation: youden | sensitivity=X "
                                                       "| specificity=X | a fixed threshold such as 0.5")
    ensemble: Literal["auto", "seeds", "folds", "none"] = Field(
        "auto", description="the chosen configuration also as one model averaging its members' probabilities "
                            "(best/<group>/ensemble/): auto = every member the sweep trained for it (seeds x "
                            "folds); seeds = the seeds of its first fold; folds = its lowest seed of every fold; "
                            "none = no ensemble")
    top_k: Int = Field(8, ge=1, description="beyond this many configurations REPORT.md details (and test "
                                            "evaluates) a shortlist: each group's best on validation plus the "
                                            "top_k overall")

    _switch = field_validator("shortcut_check", mode="before")(_on_off)
    _rule = field_validator("operating_point", mode="before")(_operating_point)


class MlflowSpec(Section):
    """Each trial a run of an MLflow experiment (Ray's MLflowLoggerCallback); the chosen model at the end."""

    uri: str | None = Field(None, description="tracking URI: a server (http://...), a folder (a path or file: URI: "
                                              "a file store) or a database (sqlite:///..., needs the full mlflow "
                                              "package); default MLFLOW_TRACKING_URI, else OUTPUT/mlruns")
    experiment: str | None = Field(None, min_length=1, description="the experiment's name (default: the sweep's "
                                                                   "name)")

    def resolved_uri(self, output_dir: Path) -> str:
        """The URI the sweep logs to: ``uri`` (a bare path made an absolute ``file:`` URI), else
        MLFLOW_TRACKING_URI, else a file store in ``output_dir/mlruns``."""
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or str(output_dir / MLFLOW_FOLDER)
        return Path(uri).resolve().as_uri() if ":" not in uri else uri


class WandbSpec(Section):
    """Each trial a run of a Weights & Biases project (Ray's WandbLoggerCallback); a summary run at the end."""

    project: str = Field(min_length=1, description="the W&B project")
    mode: Literal["offline", "online"] = Field("offline", description="offline writes runs to disk only "
                                                                      "(`wandb sync` uploads them later)")
    dir: str | None = Field(None, description="the folder W&B writes its wandb/ folder into (default: OUTPUT)")


class TrackingSpec(Section):
    """Experiment trackers the sweep logs to (each an optional extra: pip install 'covid_tune[mlflow]' or
    'covid_tune[wandb]')."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None
