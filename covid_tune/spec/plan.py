"""Spec -> plan: expand the grid into one :class:`HParams` per trial, keyed by config id."""

from __future__ import annotations

import itertools
from dataclasses import asdict

from tabulate import tabulate

from covid_tune.engine.hparams import HParams
from covid_tune.models.registry import freeze_label
from covid_tune.spec.load import Spec
from covid_tune.spec.sections import TRAINER_AXES


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand(spec: Spec) -> dict[str, HParams]:
    """Every trial of the sweep, in grid order, keyed by a readable unique config id.

    The id joins backbone, freeze level, loss, every extra trainer axis and the seed, e.g.
    ``resnet18-fc_only-ce-lr0.01-s0``. Trials differing only in seed share a ``group``. With
    ``data.folds`` K, each is K trials, ``{group}-f{fold}-s{seed}``, of the same group.
    """
    folds = list(range(spec.data.folds)) if spec.data.folds else [None]
    extra_axes = [a for a in TRAINER_AXES if getattr(spec.grid, a) is not None]
    trainer = spec.trainer.model_dump()
    plan: dict[str, HParams] = {}
    for backbone, levels in spec.freeze_levels().items():
        if backbone not in spec.grid.backbone:
            continue
        axes = [levels, spec.grid.loss] + [getattr(spec.grid, a) for a in extra_axes] + [spec.grid.seed]
        axes.insert(len(axes) - 1, folds)  # the fold between the group and the seed: {group}-f{fold}-s{seed}
        for freeze, loss, *rest in itertools.product(*axes):
            values, fold, seed = dict(zip(extra_axes, rest[:-2])), rest[-2], rest[-1]
            group = "-".join([backbone, freeze, loss] + [f"{a}{_fmt(v)}" for a, v in values.items()])
            settings = {**{k: trainer[k] for k in TRAINER_AXES}, **values}
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
                grayscale=spec.data.grayscale, augment=spec.data.augment, num_workers=spec.data.num_workers,
                **settings,
            )
    return plan


def axis_columns(plan: dict[str, HParams]) -> list[str]:
    """The trainer settings that take more than one value in this plan."""
    return [a for a in TRAINER_AXES if len({getattr(h, a) for h in plan.values()}) > 1]


def plan_table(plan: dict[str, HParams]) -> str:
    """The trial grid as a text table (for ``--dry-run``)."""
    extra = axis_columns(plan)
    folds = any(h.fold is not None for h in plan.values())
    rows = []
    for i, (cid, h) in enumerate(plan.items(), 1):
        d = asdict(h)
        fold = [] if not folds else [h.fold]
        rows.append([i, cid, h.backbone, freeze_label(h.backbone, h.freeze), h.loss] + fold + [h.seed]
                    + [_fmt(d[a]) for a in extra] + [h.epochs])
    headers = (["Sr #", "config_id", "Backbone", "Layers", "Loss"] + (["Fold"] if folds else []) + ["Seed"] + extra
               + ["Max epochs"])
    return tabulate(rows, headers=headers, tablefmt="github")


def tune_params(spec: Spec, plan: dict[str, HParams]) -> dict[str, dict]:
    """Each trial's hyperparameters as Tune should show them: config id, backbone, freeze level, loss,
    seed and every trainer axis the grid sets (one flat dict of plain values per config id)."""
    extra = [a for a in TRAINER_AXES if getattr(spec.grid, a) is not None]
    return {cid: {"config_id": cid, "backbone": h.backbone, "freeze": h.freeze, "loss": h.loss, "seed": h.seed,
                  **({"fold": h.fold} if h.fold is not None else {}), **{a: getattr(h, a) for a in extra}}
            for cid, h in plan.items()}

