"""Spec -> plan: the grid product, readable unique ids, per-backbone freeze levels, groups, trainer axes."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict

import pytest

from covid_tune.engine.hparams import HParams
from covid_tune.spec.load import validate
from covid_tune.spec.plan import axis_columns, expand, plan_table

ID_RE = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*-s\d+$")


@pytest.fixture
def grid_raw(tiny_raw: dict) -> dict:
    """2 backbones x 2 freeze levels x 2 lrs x 3 seeds = 24 trials."""
    tiny_raw["grid"] = {"backbone": ["tiny_cnn", "resnet18"], "freeze": ["fc_only", "none"], "loss": "ce",
                        "lr": [0.1, 0.01], "seed": [0, 1, 2]}
    return tiny_raw


def test_number_of_trials_is_product_of_axes(grid_raw: dict) -> None:
    plan = expand(validate(grid_raw))
    assert len(plan) == 2 * 2 * 2 * 3
    combos = {(h.backbone, h.freeze, h.loss, h.lr, h.seed) for h in plan.values()}
    assert combos == set(itertools.product(["tiny_cnn", "resnet18"], ["fc_only", "none"], ["ce"], [0.1, 0.01],
                                           [0, 1, 2]))


def test_product_with_more_axes(tiny_raw: dict) -> None:
    tiny_raw["grid"] = {"backbone": ["tiny_cnn"], "freeze": ["fc_only", "block1", "none"], "loss": "ce",
                        "optimizer": ["sgd", "adam"], "batch_size": [4, 8], "dropout": [0.0, 0.2, 0.5],
                        "seed": [0, 1]}
    plan = expand(validate(tiny_raw))
    assert len(plan) == 3 * 2 * 2 * 3 * 2
    assert len({(h.freeze, h.optimizer, h.batch_size, h.dropout, h.seed) for h in plan.values()}) == len(plan)
    assert set(axis_columns(plan)) == {"optimizer", "batch_size", "dropout"}


def test_single_trial(tiny_raw: dict) -> None:
    tiny_raw["grid"]["freeze"] = "none"
    plan = expand(validate(tiny_raw))
    assert list(plan) == ["tiny_cnn-none-ce-s0"]
    assert axis_columns(plan) == []


def test_config_ids_are_unique_and_readable(grid_raw: dict) -> None:
    plan = expand(validate(grid_raw))
    ids = list(plan)
    assert len(ids) == len(set(ids)) == 24
    for cid, h in plan.items():
        assert ID_RE.match(cid), cid
        assert cid == f"{h.group}-s{h.seed}"
        assert cid.startswith(f"{h.backbone}-{h.freeze}-{h.loss}-")
        assert f"-lr{h.lr:g}-" in cid
    assert "resnet18-fc_only-ce-lr0.01-s2" in plan
    assert "tiny_cnn-none-ce-lr0.1-s0" in plan


def test_grid_order_backbone_first_seed_last(grid_raw: dict) -> None:
    ids = list(expand(validate(grid_raw)))
    assert ids[:3] == ["tiny_cnn-fc_only-ce-lr0.1-s0", "tiny_cnn-fc_only-ce-lr0.1-s1", "tiny_cnn-fc_only-ce-lr0.1-s2"]
    assert ids[-1] == "resnet18-none-ce-lr0.01-s2"


def test_per_backbone_freeze_mapping_gives_exactly_the_listed_combos(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18", "tiny_cnn", "vgg16"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only", "layer1"], "tiny_cnn": ["block1"],
                                  "vgg16": ["conv1-3", "conv1-2", "none"]}
    tiny_raw["grid"]["seed"] = [0, 1]
    plan = expand(validate(tiny_raw))
    combos = sorted({(h.backbone, h.freeze) for h in plan.values()})
    assert combos == sorted([("resnet18", "fc_only"), ("resnet18", "layer1"), ("tiny_cnn", "block1"),
                             ("vgg16", "conv1-3"), ("vgg16", "conv1-2"), ("vgg16", "none")])
    assert len(plan) == 6 * 2


def test_freeze_mapping_backbone_without_entry_gets_none(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18", "tiny_cnn"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only", "layer1-3"]}
    plan = expand(validate(tiny_raw))
    assert sorted((h.backbone, h.freeze) for h in plan.values()) == [
        ("resnet18", "fc_only"), ("resnet18", "layer1-3"), ("tiny_cnn", "none")]


def test_trials_differing_only_by_seed_share_group(grid_raw: dict) -> None:
    plan = expand(validate(grid_raw))
    groups: dict[str, list[HParams]] = defaultdict(list)
    for h in plan.values():
        groups[h.group].append(h)
    assert len(groups) == 8
    for group, members in groups.items():
        assert sorted(h.seed for h in members) == [0, 1, 2]
        # everything but seed is the same within a group
        keys = {(h.backbone, h.freeze, h.loss, h.lr) for h in members}
        assert len(keys) == 1
        assert not re.search(r"-s\d+$", group)  # the group id carries no seed
    # and different groups differ in something other than seed
    reps = [(m[0].backbone, m[0].freeze, m[0].loss, m[0].lr) for m in groups.values()]
    assert len(set(reps)) == len(reps)


def test_extra_trainer_axes_set_hparams_and_appear_in_id(tiny_raw: dict) -> None:
    tiny_raw["grid"]["freeze"] = ["none"]
    tiny_raw["grid"]["lr"] = [0.1, 0.01]
    tiny_raw["trainer"].update(momentum=0.8, weight_decay=1e-4, optimizer="adam")
    plan = expand(validate(tiny_raw))
    assert set(plan) == {"tiny_cnn-none-ce-lr0.1-s0", "tiny_cnn-none-ce-lr0.01-s0"}
    assert plan["tiny_cnn-none-ce-lr0.1-s0"].lr == 0.1
    assert plan["tiny_cnn-none-ce-lr0.01-s0"].lr == 0.01
    for h in plan.values():  # the other trainer settings come from trainer:
        assert h.momentum == 0.8 and h.weight_decay == 1e-4 and h.optimizer == "adam"
        assert h.batch_size == 16 and h.head_hidden == 16
    assert axis_columns(plan) == ["lr"]


def test_lr_schedule_from_trainer_or_as_an_axis(tiny_raw: dict) -> None:
    tiny_raw["grid"]["freeze"] = ["none"]
    tiny_raw["trainer"]["lr_schedule"] = "cosine"
    assert [h.lr_schedule for h in expand(validate(tiny_raw)).values()] == ["cosine"]
    tiny_raw["grid"]["lr_schedule"] = ["constant", "cosine"]
    plan = expand(validate(tiny_raw))
    assert {cid: h.lr_schedule for cid, h in plan.items()} == {"tiny_cnn-none-ce-lr_scheduleconstant-s0": "constant",
                                                               "tiny_cnn-none-ce-lr_schedulecosine-s0": "cosine"}
    assert axis_columns(plan) == ["lr_schedule"]


def test_without_lr_axis_trainer_lr_is_used_and_not_in_id(tiny_raw: dict) -> None:
    plan = expand(validate(tiny_raw))
    assert set(plan) == {"tiny_cnn-fc_only-ce-s0", "tiny_cnn-none-ce-s0"}
    assert all(h.lr == 0.01 for h in plan.values())
    assert not any("lr" in cid for cid in plan)


def test_several_trainer_axes_in_id(tiny_raw: dict) -> None:
    tiny_raw["grid"] = {"backbone": "tiny_cnn", "freeze": "none", "optimizer": ["sgd", "adam"],
                        "weight_decay": [0.0, 1e-4], "seed": 0}
    plan = expand(validate(tiny_raw))
    assert len(plan) == 4
    assert "tiny_cnn-none-ce-optimizeradam-weight_decay0.0001-s0" in plan
    h = plan["tiny_cnn-none-ce-optimizeradam-weight_decay0.0001-s0"]
    assert h.optimizer == "adam" and h.weight_decay == 1e-4


def test_hparams_carry_spec_settings(tiny_raw: dict) -> None:
    tiny_raw["data"].update(label_mode="multi", implies={"infected": ["normal"]}, threshold=0.4, grayscale=False)
    tiny_raw["grid"]["loss"] = ["bce", "focal"]
    tiny_raw["trainer"].update(focal_alpha=0.3, focal_gamma=1.5, epochs=3)
    plan = expand(validate(tiny_raw))
    assert len(plan) == 2 * 2
    for h in plan.values():
        assert h.epochs == 3 and h.image_size == 32 and h.augment == "none" and h.grayscale is False
        assert h.label_mode == "multi" and h.implies == {"infected": ["normal"]} and h.threshold == 0.4
        assert h.focal_alpha == 0.3 and h.focal_gamma == 1.5 and h.weights == "none"
        assert h.lr == 0.01 and h.batch_size == 16 and h.head_hidden == 16
    assert {h.loss for h in plan.values()} == {"bce", "focal"}


def test_plan_table_lists_every_config_id(grid_raw: dict) -> None:
    plan = expand(validate(grid_raw))
    table = plan_table(plan)
    rows = [ln for ln in table.splitlines() if ln.startswith("|")][2:]  # header and separator first
    assert len(rows) == len(plan)
    for row, cid in zip(rows, plan):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == cid
    assert "config_id" in table and "lr" in table.splitlines()[0]
    assert "Only FC unfrozen" in table and "Entire network unfrozen" in table  # freeze labels
