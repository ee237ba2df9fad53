"""Spec -> plan: expand the grid into one :class:`HParams` per trial, keyed by config id.

Listed axes are a full grid. Axes given as distributions (``grid.lr: {loguniform: [lo, hi]}``) are
sampled: ``search.samples`` settings per grid cell, each trained once per seed, in groups
``{cell}-n{K}`` (ids ``{cell}-n{K}-s{seed}``). ``search.algorithm: random`` draws them here, seeded by
``search.seed`` and the cell's name (the same seed, the same settings); ``optuna`` leaves them to the
sweep's searcher (:mod:`covid_tune.sweep.search`), so those plan entries hold the trainer's values until
:func:`with_trial_values` puts in what the trial was given.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import replace

import numpy as np
from tabulate import tabulate

from covid_tune.data.augment import PRESETS, augment_label
from covid_tune.engine.hparams import HParams
from covid_tune.models.registry import freeze_label
from covid_tune.spec.load import Spec
from covid_tune.spec.sections import INTEGER_AXES, SWEPT_AXES, TRAINER_AXES, Distribution, augment_value


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def readable(value: object) -> str:
    """A setting for a table: a float as typed when it has at most 4 significant digits (0.001, 3e-05),
    else to 3 (a sampled 0.005023417 reads 0.00502); params.json and results.csv keep every digit."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:g}" if float(f"{value:.4g}") == value else f"{value:.3g}"


def _id_part(axis: str, value: object) -> str:
    return f"aug{augment_label(value)}" if axis == "augment" else f"{axis}{_fmt(value)}"


def draw(dist: Distribution, rng: np.random.Generator, integer: bool = False) -> object:
    """One value of ``dist`` from ``rng`` (a whole number, within the bounds, for an integer axis)."""
    if dist.kind == "choice":
        return dist.args[int(rng.integers(len(dist.args)))]
    lo, hi = dist.args
    value = (math.exp(rng.uniform(math.log(lo), math.log(hi))) if dist.kind == "loguniform"
             else float(rng.uniform(lo, hi)))
    return min(max(int(round(value)), int(lo)), int(hi)) if integer else value


def cell_rng(seed: int, cell: str) -> np.random.Generator:
    """The random search's generator of one grid cell: ``search.seed`` and the cell's name, so a cell's
    draws stay the same when other cells are added."""
    return np.random.default_rng([seed, zlib.crc32(cell.encode())])


def expand(spec: Spec) -> dict[str, HParams]:
    """Every trial of the sweep, in grid order, keyed by a readable unique config id.

    The id joins backbone, freeze level, loss, every extra listed axis, the sample number (``n{K}``, when
    anything is sampled) and the seed, e.g. ``resnet18-fc_only-ce-lr0.01-s0``. Trials differing only in
    seed share a ``group``. With ``data.folds`` K, each is K trials, ``{group}-f{fold}-s{seed}``, of the
    same group.
    """
    folds = list(range(spec.data.folds)) if spec.data.folds else [None]
    listed = [a for a in SWEPT_AXES if isinstance(getattr(spec.grid, a), list)]
    sampled = spec.grid.distributions()
    samples = spec.search.samples if sampled else 0
    trainer = spec.trainer.model_dump()
    plan: dict[str, HParams] = {}
    for backbone, levels in spec.freeze_levels().items():
        if backbone not in spec.grid.backbone:
            continue
        axes = [levels, spec.grid.loss] + [getattr(spec.grid, a) for a in listed]
        for freeze, loss, *rest in itertools.product(*axes):
            values = dict(zip(listed, rest))
            cell = "-".join([backbone, freeze, loss] + [_id_part(a, v) for a, v in values.items()])
            rng = cell_rng(spec.search.seed, cell)
            draws: list[tuple[str, dict]] = [(cell, {})]
            if samples:
                draws = []
                for k in range(samples):
                    drawn = ({a: draw(d, rng, a in INTEGER_AXES) for a, d in sampled.items()}
                             if spec.search.algorithm == "random" else {})
                    draws.append((f"{cell}-n{k}", drawn))
            for group, drawn in draws:
                settings = {**{k: trainer[k] for k in TRAINER_AXES}, "augment": spec.data.augment,
                            **values, **drawn}
                settings["augment"] = augment_value(settings["augment"])
                # the fold between the group and the seed: {group}-f{fold}-s{seed}
                for fold, seed in itertools.product(folds, spec.grid.seed):
                    cid = f"{group}-s{seed}" if fold is None else f"{group}-f{fold}-s{seed}"
                    plan[cid] = HParams(
                        backbone=backbone, freeze=freeze, loss=loss, seed=seed, group=group, fold=fold,
                        epochs=spec.trainer.epochs, weights=spec.trainer.weights,
                        focal_alpha=spec.trainer.focal_alpha, focal_gamma=spec.trainer.focal_gamma,
                        feature_cache=spec.trainer.feature_cache,
                        feature_cache_gb=spec.trainer.feature_cache_gb, precision=spec.trainer.precision,
                        compile=spec.trainer.compile,
                        image_size=spec.data.image_size, label_mode=spec.data.label_mode,
                        implies={k: list(v) for k, v in spec.data.implies.items()}, threshold=spec.data.threshold,
                        grayscale=spec.data.grayscale, num_workers=spec.data.num_workers,
                        **settings,
                    )
    return plan


def cells(plan: dict[str, HParams]) -> dict[str, list[str]]:
    """Grid cell -> its groups (``{cell}-n{K}``) in plan order; a group is its own cell when nothing is sampled."""
    out: dict[str, list[str]] = {}
    for h in plan.values():
        cell = h.group.rsplit("-n", 1)[0] if _is_sample(h.group) else h.group
        if h.group not in out.setdefault(cell, []):
            out[cell].append(h.group)
    return out


def _is_sample(group: str) -> bool:
    head, sep, k = group.rpartition("-n")
    return bool(sep and head and k.isdigit())


def with_trial_values(hp: HParams, config: dict) -> HParams:
    """``hp`` with the swept settings a trial was given (its Tune config or params.json): what a searcher
    sampled at run time. A custom augmentation travels as its label, so only a preset's name replaces it."""
    update = {a: config[a] for a in TRAINER_AXES if a in config and config[a] is not None}
    for a in INTEGER_AXES:
        if a in update:
            update[a] = int(update[a])
    if config.get("augment") in PRESETS:
        update["augment"] = config["augment"]
    return replace(hp, **update) if any(getattr(hp, k) != v for k, v in update.items()) else hp


def _axis_value(h: HParams, axis: str) -> object:
    return augment_label(h.augment) if axis == "augment" else getattr(h, axis)


def axis_columns(plan: dict[str, HParams]) -> list[str]:
    """The swept settings that take more than one value in this plan."""
    return [a for a in SWEPT_AXES if len({_axis_value(h, a) for h in plan.values()}) > 1]


def plan_table(plan: dict[str, HParams], spec: Spec | None = None) -> str:
    """The trial grid as a text table (for ``--dry-run``); settings a searcher will sample (optuna) read
    ``(sampled)``."""
    at_run_time = set(spec.grid.distributions()) if spec is not None and spec.search.algorithm == "optuna" else set()
    extra = list(dict.fromkeys(axis_columns(plan) + sorted(at_run_time, key=SWEPT_AXES.index)))
    folds = any(h.fold is not None for h in plan.values())
    rows = []
    for i, (cid, h) in enumerate(plan.items(), 1):
        rows.append([i, cid, h.backbone, freeze_label(h.backbone, h.freeze), h.loss] + ([h.fold] if folds else [])
                    + [h.seed]
                    + ["(sampled)" if a in at_run_time else readable(_axis_value(h, a)) for a in extra] + [h.epochs])
    headers = (["Sr #", "config_id", "Backbone", "Layers", "Loss"] + (["Fold"] if folds else []) + ["Seed"] + extra
               + ["Max epochs"])
    return tabulate(rows, headers=headers, tablefmt="github")


def search_summary(spec: Spec, plan: dict[str, HParams]) -> str:
    """What is searched, for ``--dry-run``: the grid cells, the distributions and the number of trials
    ("" for a plain grid)."""
    sampled = spec.grid.distributions()
    if not sampled:
        return ""
    s = spec.search
    how = {"random": "independent draws", "optuna": "Optuna's TPE, one search per grid cell"}[s.algorithm]
    groups = cells(plan)
    lines = [f"search: {s.algorithm} ({how}, seed {s.seed}): {len(groups)} grid cell(s) x {s.samples} sample(s) "
             f"x {len(spec.grid.seed)} seed(s)" + (f" x {spec.data.folds} fold(s)" if spec.data.folds else "")
             + f" = {len(plan)} trial(s)",
             "distributions: " + ", ".join(f"{a} ~ {d.text()}" for a, d in sampled.items()),
             "grid cells: " + ", ".join(groups)]
    return "\n".join(lines)


def sampled_axes(spec: Spec) -> list[str]:
    """The settings drawn from distributions (empty for a plain grid)."""
    return list(spec.grid.distributions())


def tune_params(spec: Spec, plan: dict[str, HParams]) -> dict[str, dict]:
    """Each trial's hyperparameters as Tune should show them: config id, backbone, freeze level, loss,
    seed and every swept setting (one flat dict of plain values per config id; augmentation by its
    label). Settings a searcher samples at run time (optuna) are left to it."""
    at_run_time = set(sampled_axes(spec)) if spec.search.algorithm == "optuna" else set()
    extra = [a for a in SWEPT_AXES if getattr(spec.grid, a) is not None and a not in at_run_time]
    return {cid: {"config_id": cid, "backbone": h.backbone, "freeze": h.freeze, "loss": h.loss, "seed": h.seed,
                  **({"fold": h.fold} if h.fold is not None else {}), **{a: _axis_value(h, a) for a in extra}}
            for cid, h in plan.items()}


