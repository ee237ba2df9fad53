"""Sweep specs: YAML -> validated, frozen :class:`Spec`.

Every problem is reported as ``key.path: what is wrong (allowed: ...)`` in one
:class:`SpecError`, before anything starts. Relative paths are resolved against the current
directory.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from covid_tune.engine import schedule
from covid_tune.engine.losses import LOSSES
from covid_tune.models import registry as models
from covid_tune.spec.sections import (
    UNION_TAGS,
    DataSpec,
    GridSpec,
    RaySpec,
    ReportSpec,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    Section,
    TrackingSpec,
    TrainerSpec,
)


class SpecError(ValueError):
    """The spec cannot be used; the message names each key and what is allowed."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


class Spec(Section):
    name: str
    output: str | None = None
    data: DataSpec
    grid: GridSpec
    search: SearchSpec = SearchSpec()
    trainer: TrainerSpec = TrainerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    ray: RaySpec = RaySpec()
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        # the name is a folder (runs/<name>, OUTPUT/ray/<name>): "..", "." or a separator would
        # point it at the working directory or a parent of it, which --overwrite would then delete
        if not NAME_PATTERN.fullmatch(v):
            raise ValueError(f"{v!r} cannot name the sweep's folders runs/<name> and ray/<name> (allowed: letters, "
                             "digits, '_', '-' and '.', not starting with '.'; no '/', no '..')")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> Spec:
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
        grace = schedule.grace_problems(self.scheduler.grace_period, self.all_freeze_levels(), self.trainer.epochs)
        problems += grace or _asha_problems(self.scheduler, self.trainer.epochs)
        problems += _positive_problems(self)
        problems += _search_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def freeze_levels(self) -> dict[str, list[str]]:
        """Freeze levels per backbone (a list applies to every backbone)."""
        f = self.grid.freeze
        if isinstance(f, dict):
            return {b: list(f.get(b, ["none"])) for b in dict.fromkeys(list(self.grid.backbone) + list(f))}
        return {b: list(f) for b in self.grid.backbone}

    def all_freeze_levels(self) -> list[str]:
        """Every freeze level of the grid, over all backbones (repeats kept)."""
        return [level for levels in self.freeze_levels().values() for level in levels]

    @property
    def asha_max_t(self) -> int:
        """ASHA's last possible cut: ``scheduler.max_t``, else ``trainer.epochs``."""
        return self.scheduler.max_t or self.trainer.epochs

    def asha_rung_epochs(self) -> tuple[list[int], str]:
        """The epochs at which ASHA (one bracket) judges some trial ([] without ASHA), and the per-freeze-level
        text (:func:`covid_tune.engine.schedule.rungs_text`): the rungs of the scheduler that Tune is given."""
        s = self.scheduler
        if not s.asha:
            return [], ""
        at = (s.grace_period, s.reduction_factor, self.asha_max_t, self.trainer.epochs, self.all_freeze_levels())
        return schedule.rung_epochs(*at), schedule.rungs_text(*at)

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


def _positive_problems(spec: Spec) -> list[str]:
    """``report.positive``: single-label only, and a class of the data where the spec names the classes."""
    positive = spec.report.positive
    if positive is None:
        return []
    if spec.data.label_mode != "single":
        return ["report.positive: a multi-label task is evaluated class by class; leave report.positive out"]
    if spec.data.synthetic is not None:
        classes = sorted({spec.data.class_map.get(c, c) for c in spec.data.synthetic.classes})
        if positive not in classes:
            return [f"report.positive: {positive!r} is not a class of the data (allowed: {', '.join(classes)})"]
    return []


def _search_problems(spec: Spec) -> list[str]:
    """A distribution needs a search that samples; a search that samples needs a distribution."""
    sampled, algorithm = list(spec.grid.distributions()), spec.search.algorithm
    if sampled and algorithm == "grid":
        return [f"grid.{a}: a distribution needs search.algorithm random or optuna (it is grid; or list values)"
                for a in sampled]
    if not sampled and algorithm != "grid":
        return [f"search.algorithm {algorithm}: no grid axis is a distribution, so nothing is sampled (give one, "
                "e.g. grid.lr: {loguniform: [1.0e-4, 1.0e-2]}, or use grid)"]
    if not sampled and spec.search.samples > 1:
        return [f"search.samples ({spec.search.samples}): only a search that samples (random, optuna) draws "
                "several settings per grid cell"]
    return []


def _asha_problems(sched: SchedulerSpec, epochs: int) -> list[str]:
    # in ASHA's time units, where a per-level grace is its smallest value (covid_tune.engine.schedule)
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
    n_rungs = len(schedule.asha_rungs(sched.grace_period, sched.reduction_factor, max_t))
    if sched.asha and sched.brackets > max(n_rungs, 1):
        problems.append(f"scheduler.brackets ({sched.brackets}): with grace_period {sched.grace_period}, "
                        f"reduction_factor {sched.reduction_factor:g} and max_t {max_t} ASHA has {n_rungs} rung(s), "
                        f"so a bracket past the {max(n_rungs, 1)}th would never cut (allowed: 1-{max(n_rungs, 1)})")
    return problems


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The section model inside a field's type (through Optional, unions, lists and Annotated)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for m in map(_model_in, typing.get_args(ann)) if m is not None), None)


def _allowed_keys(loc: tuple) -> list[str] | None:
    model: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list axis
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return list(model.model_fields)


def _error_lines(err: ValidationError, skip: set[tuple] = frozenset()) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("list[", "dict[")))
                    and p not in UNION_TAGS)
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
            if part in UNION_TAGS:
                continue
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
        Spec.model_construct(**sections)._combinations()  # the model validator, called as the plain method it is
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
