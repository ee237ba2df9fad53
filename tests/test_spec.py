"""Spec validation: good input is normalized, every kind of bad input is one SpecError naming key and values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from covid_tune.spec.load import SpecError, apply_overrides, load_spec, validate

TOP_LEVEL_KEYS = ("name", "output", "data", "grid", "trainer", "scheduler", "resources", "ray")
TRAINER_KEYS = ("epochs", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "head_hidden", "dropout",
                "weights", "focal_alpha", "focal_gamma")
RESNET18_LEVELS = ("fc_only", "layer1-3", "layer1", "none")


def spec_error(raw, *needles: str) -> str:
    """Validate ``raw``, expect a SpecError, and check every needle is in its message."""
    with pytest.raises(SpecError) as info:
        validate(raw)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in SpecError message:\n{msg}"
    return msg


def multi(raw: dict, loss: str = "bce") -> dict:
    raw["data"]["label_mode"] = "multi"
    raw["grid"]["loss"] = [loss]
    return raw


# --- good input --------------------------------------------------------------------------------

def test_tiny_raw_validates(tiny_raw: dict, tmp_path: Path) -> None:
    spec = validate(tiny_raw)
    assert spec.name == "tiny"
    assert spec.grid.backbone == ["tiny_cnn"]
    assert spec.grid.freeze == ["fc_only", "none"]
    assert spec.grid.loss == ["ce"] and spec.grid.seed == [0]
    assert spec.trainer.lr == 0.01 and spec.trainer.epochs == 2 and spec.trainer.weights == "none"
    assert spec.data.image_size == 32 and spec.data.augment == "none"
    assert spec.data.synthetic is not None and spec.data.synthetic.classes == ["infected", "normal"]
    assert spec.data.synthetic.train == 24 and spec.data.root is None
    assert spec.output == str((tmp_path / "out").resolve())
    assert spec.scheduler.mode == "min"
    assert spec.freeze_levels() == {"tiny_cnn": ["fc_only", "none"]}


def test_validate_does_not_modify_its_input(tiny_raw: dict) -> None:
    before = copy.deepcopy(tiny_raw)
    validate(tiny_raw)
    assert tiny_raw == before


@pytest.mark.parametrize("key, value, expected", [
    ("seed", 0, [0]),
    ("seed", 7, [7]),
    ("loss", "ce", ["ce"]),
    ("backbone", "tiny_cnn", ["tiny_cnn"]),
    ("freeze", "none", ["none"]),
    ("lr", 0.1, [0.1]),
    ("optimizer", "adam", ["adam"]),
    ("batch_size", 4, [4]),
])
def test_scalars_become_one_value_axes(tiny_raw: dict, key: str, value, expected: list) -> None:
    tiny_raw["grid"][key] = value
    assert getattr(validate(tiny_raw).grid, key) == expected


def test_unset_trainer_axes_stay_none(tiny_raw: dict) -> None:
    grid = validate(tiny_raw).grid
    assert grid.lr is None and grid.optimizer is None and grid.batch_size is None


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("val_acc", "max"), ("val_f1", "max")])
def test_scheduler_mode_is_derived_from_metric(tiny_raw: dict, metric: str, mode: str) -> None:
    tiny_raw["scheduler"] = {"metric": metric, "grace_period": 1}
    assert validate(tiny_raw).scheduler.mode == mode
    tiny_raw["scheduler"]["mode"] = mode  # stating the right mode explicitly is fine
    assert validate(tiny_raw).scheduler.mode == mode


def test_relative_data_root_is_made_absolute(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_raw["data"] = {"root": "some/data"}
    spec = validate(tiny_raw)
    assert spec.data.root == str(tmp_path.resolve() / "some" / "data")


def test_relative_storage_path_is_made_absolute(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_raw["ray"] = {"storage_path": "store"}
    assert validate(tiny_raw).ray.storage_path == str(tmp_path.resolve() / "store")


@pytest.mark.parametrize("weights", ["none", "imagenet"])
def test_weights_keywords_are_kept(tiny_raw: dict, tmp_path: Path, monkeypatch, weights: str) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_raw["grid"]["backbone"] = ["resnet18"]
    tiny_raw["trainer"]["weights"] = weights
    assert validate(tiny_raw).trainer.weights == weights


def test_relative_weights_file_is_made_absolute(tiny_raw: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_raw["grid"]["backbone"] = ["resnet18"]
    tiny_raw["trainer"]["weights"] = "weights/resnet18.pt"
    assert validate(tiny_raw).trainer.weights == str(tmp_path.resolve() / "weights" / "resnet18.pt")


def test_freeze_mapping_per_backbone(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18", "tiny_cnn"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only", "layer1"], "tiny_cnn": ["block1"]}
    spec = validate(tiny_raw)
    assert spec.freeze_levels() == {"resnet18": ["fc_only", "layer1"], "tiny_cnn": ["block1"]}


def test_freeze_mapping_missing_a_backbone_defaults_to_none(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18", "tiny_cnn"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only"]}
    assert validate(tiny_raw).freeze_levels() == {"resnet18": ["fc_only"], "tiny_cnn": ["none"]}


@pytest.mark.parametrize("gpu", [0, 0.25, 0.5, 1, 2, 4.0])
def test_whole_or_fractional_gpus_up_to_one_are_fine(tiny_raw: dict, gpu: float) -> None:
    tiny_raw["resources"]["gpu"] = gpu
    assert validate(tiny_raw).resources.gpu == gpu


def test_multi_label_with_implies_validates(tiny_raw: dict) -> None:
    tiny_raw["data"]["implies"] = {"covid": ["pneumonia"]}
    multi(tiny_raw, "focal")
    spec = validate(tiny_raw)
    assert spec.data.label_mode == "multi" and spec.data.implies == {"covid": ["pneumonia"]}
    assert spec.grid.loss == ["focal"]


# --- bad input: one SpecError naming the key and what is allowed ----------------------------------

def test_unknown_top_level_key_lists_allowed_keys(tiny_raw: dict) -> None:
    tiny_raw["epochs"] = 3
    spec_error(tiny_raw, "epochs", "unknown key", *TOP_LEVEL_KEYS)


def test_unknown_trainer_key_lists_trainer_keys(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["learning_rate"] = 0.1
    spec_error(tiny_raw, "trainer.learning_rate", "unknown key", *TRAINER_KEYS)


def test_unknown_grid_key_lists_grid_keys(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbones"] = ["tiny_cnn"]
    spec_error(tiny_raw, "grid.backbones", "unknown key", "backbone", "freeze", "loss", "seed", "lr")


def test_unknown_key_in_optional_section_lists_its_keys(tiny_raw: dict) -> None:
    tiny_raw["data"]["synthetic"]["colour"] = "red"
    spec_error(tiny_raw, "data.synthetic.colour", "unknown key", "classes", "train", "validation", "test",
               "image_size", "seed")


@pytest.mark.parametrize("key, bad, allowed", [("optimizer", "rmsprop", ("sgd", "adam")),
                                               ("lr_schedule", "step", ("constant", "cosine"))])
def test_bad_literal_names_allowed_values(tiny_raw: dict, key: str, bad: str, allowed: tuple) -> None:
    tiny_raw["trainer"][key] = bad
    spec_error(tiny_raw, f"trainer.{key}", *allowed)
    del tiny_raw["trainer"][key]
    tiny_raw["grid"][key] = [allowed[0], bad]
    spec_error(tiny_raw, f"grid.{key}", *allowed)


def test_bad_metric_names_allowed_metrics(tiny_raw: dict) -> None:
    tiny_raw["scheduler"]["metric"] = "val_auc"
    spec_error(tiny_raw, "scheduler.metric", "val_acc", "val_f1", "val_loss")


@pytest.mark.parametrize("section, key, value, bound", [
    ("trainer", "lr", 0, "greater than 0"),
    ("trainer", "lr", -0.01, "greater than 0"),
    ("trainer", "epochs", 0, "greater than or equal to 1"),
    ("trainer", "batch_size", 0, "greater than or equal to 1"),
    ("trainer", "momentum", 1.0, "less than 1"),
    ("trainer", "dropout", -0.1, "greater than or equal to 0"),
    ("trainer", "head_hidden", -1, "greater than or equal to 0"),
    ("resources", "cpus", 0, "greater than 0"),
    ("data", "image_size", 8, "greater than or equal to 16"),
    ("scheduler", "grace_period", 0, "greater than or equal to 1"),
])
def test_out_of_range_numbers(tiny_raw: dict, section: str, key: str, value, bound: str) -> None:
    tiny_raw[section][key] = value
    spec_error(tiny_raw, f"{section}.{key}", bound)


def test_unknown_backbone_lists_backbones(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["tiny_cnn", "alexnet"]
    spec_error(tiny_raw, "grid.backbone", "alexnet", "vgg16", "resnet18", "tiny_cnn")


def test_freeze_level_the_backbone_lacks_lists_its_levels(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18"]
    tiny_raw["grid"]["freeze"] = ["conv1-3"]
    msg = spec_error(tiny_raw, "grid.freeze", "conv1-3", "resnet18", *RESNET18_LEVELS)
    assert "conv1-2" not in msg  # only resnet18's levels, not vgg16's


def test_freeze_list_is_checked_for_every_backbone(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["vgg16", "resnet18"]
    tiny_raw["grid"]["freeze"] = ["conv1-3"]  # fine for vgg16, not for resnet18
    msg = spec_error(tiny_raw, "grid.freeze", "resnet18", *RESNET18_LEVELS)
    assert "'vgg16' has no freeze level" not in msg


def test_freeze_mapping_with_a_level_the_backbone_lacks(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18", "tiny_cnn"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only"], "tiny_cnn": ["layer1"]}
    spec_error(tiny_raw, "grid.freeze", "tiny_cnn", "layer1", "fc_only", "block1", "none")


@pytest.mark.parametrize("key", ["vgg16", "alexnet"])
def test_freeze_mapping_key_not_in_grid_backbone(tiny_raw: dict, key: str) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18"]
    tiny_raw["grid"]["freeze"] = {"resnet18": ["fc_only"], key: ["none"]}
    spec_error(tiny_raw, "grid.freeze", key, "grid.backbone", "resnet18")


@pytest.mark.parametrize("loss, allowed", [("bce", ["ce"]), ("focal", ["ce"])])
def test_multi_label_loss_with_single_label_mode(tiny_raw: dict, loss: str, allowed: list) -> None:
    tiny_raw["grid"]["loss"] = [loss]
    spec_error(tiny_raw, "grid.loss", loss, "data.label_mode", "single", *allowed)


def test_ce_with_multi_label_mode(tiny_raw: dict) -> None:
    tiny_raw["data"]["label_mode"] = "multi"
    spec_error(tiny_raw, "grid.loss", "'ce'", "data.label_mode", "multi", "bce", "focal")


def test_unknown_loss_lists_losses(tiny_raw: dict) -> None:
    tiny_raw["grid"]["loss"] = ["mse"]
    spec_error(tiny_raw, "grid.loss", "mse", "ce", "bce", "focal")


def test_data_with_root_and_synthetic(tiny_raw: dict) -> None:
    tiny_raw["data"]["root"] = "/some/folder"
    spec_error(tiny_raw, "data", "data.root", "data.synthetic")


def test_data_with_neither_root_nor_synthetic(tiny_raw: dict) -> None:
    del tiny_raw["data"]["synthetic"]
    spec_error(tiny_raw, "data", "data.root", "data.synthetic")


def test_implies_without_multi_label(tiny_raw: dict) -> None:
    tiny_raw["data"]["implies"] = {"infected": ["normal"]}
    spec_error(tiny_raw, "data.implies", "multi")


@pytest.mark.parametrize("metric, mode, right", [("val_loss", "max", "min"), ("val_acc", "min", "max"),
                                                  ("val_f1", "min", "max")])
def test_scheduler_mode_contradicting_metric(tiny_raw: dict, metric: str, mode: str, right: str) -> None:
    tiny_raw["scheduler"].update(metric=metric, mode=mode)
    spec_error(tiny_raw, "scheduler", metric, f"'{mode}'", f"'{right}'")


def test_grace_period_above_epochs(tiny_raw: dict) -> None:
    tiny_raw["scheduler"]["grace_period"] = 3  # epochs is 2
    spec_error(tiny_raw, "scheduler.grace_period", "3", "trainer.epochs", "2")


def test_grace_period_per_freeze_level(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["epochs"] = 8
    tiny_raw["scheduler"]["grace_period"] = {"fc_only": 2, "none": 6}
    assert validate(tiny_raw).scheduler.grace_period == {"fc_only": 2, "none": 6}


@pytest.mark.parametrize("grace, needles", [
    ({"fc_only": 2, "layer1": 4, "none": 6}, ["scheduler.grace_period.layer1", "'layer1'", "allowed: fc_only, none"]),
    ({"fc_only": 2, "none": 9}, ["scheduler.grace_period.none", "9", "allowed: 1-8", "trainer.epochs"]),
    ({"fc_only": 2}, ["scheduler.grace_period", "none", "every freeze level"]),
    ({"fc_only": 0, "none": 2}, ["scheduler.grace_period", "fc_only", "greater than or equal to 1"]),
    ({"fc_only": 1.5, "none": 2}, ["scheduler.grace_period", "fc_only", "whole number"]),
    ({}, ["scheduler.grace_period", "empty", "fc_only, none"]),
])
def test_bad_grace_period_mapping_names_key_and_allowed(tiny_raw: dict, grace: dict, needles: list[str]) -> None:
    tiny_raw["trainer"]["epochs"] = 8
    tiny_raw["scheduler"]["grace_period"] = grace
    spec_error(tiny_raw, *needles)


def test_imagenet_weights_for_tiny_cnn(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["weights"] = "imagenet"
    spec_error(tiny_raw, "trainer.weights", "imagenet", "tiny_cnn")


def test_imagenet_weights_for_resnet18_pass_validation(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = ["resnet18"]
    tiny_raw["trainer"]["weights"] = "imagenet"
    assert validate(tiny_raw).trainer.weights == "imagenet"


def test_weights_download_defaults_to_auto_and_takes_never_only(tiny_raw: dict) -> None:
    assert validate(tiny_raw).trainer.weights_download == "auto"
    tiny_raw["trainer"]["weights_download"] = "never"
    assert validate(tiny_raw).trainer.weights_download == "never"
    tiny_raw["trainer"]["weights_download"] = "offline"
    spec_error(tiny_raw, "trainer.weights_download", "'auto'", "'never'")


@pytest.mark.parametrize("gpu", [1.5, 2.25])
def test_fractional_gpu_above_one(tiny_raw: dict, gpu: float) -> None:
    tiny_raw["resources"]["gpu"] = gpu
    spec_error(tiny_raw, "resources.gpu", "fraction")


def test_negative_gpu(tiny_raw: dict) -> None:
    tiny_raw["resources"]["gpu"] = -1
    spec_error(tiny_raw, "resources.gpu", "greater than or equal to 0")


def test_bad_name(tiny_raw: dict) -> None:
    tiny_raw["name"] = "my sweep/1"
    spec_error(tiny_raw, "name")


def test_empty_backbone_axis(tiny_raw: dict) -> None:
    tiny_raw["grid"]["backbone"] = []
    spec_error(tiny_raw, "grid.backbone")


def test_missing_required_sections() -> None:
    msg = spec_error({}, "name", "data", "grid", "missing")
    assert "trainer" not in msg  # sections with defaults are not required


@pytest.mark.parametrize("raw", [None, [1, 2], "name: x", 3])
def test_top_level_not_a_mapping(raw) -> None:
    spec_error(raw, "mapping", "name", "grid")


def test_several_field_problems_are_reported_together(tiny_raw: dict) -> None:
    tiny_raw["trainer"]["optimizer"] = "rmsprop"
    tiny_raw["resources"]["gpu"] = 1.5
    tiny_raw["bogus"] = 1
    spec_error(tiny_raw, "trainer.optimizer", "resources.gpu", "bogus")


@pytest.mark.parametrize("axis, value", [("lr", -0.1), ("lr", 0), ("batch_size", 0), ("momentum", 1.5),
                                         ("dropout", 1.0), ("head_hidden", -1), ("weight_decay", -1e-4)])
def test_grid_trainer_axes_obey_trainer_bounds(tiny_raw: dict, axis: str, value) -> None:
    tiny_raw["grid"][axis] = [value]
    spec_error(tiny_raw, f"grid.{axis}")


# --- --set overrides ---------------------------------------------------------------------------

def test_overrides_set_nested_keys_with_yaml_types(tiny_raw: dict) -> None:
    before = copy.deepcopy(tiny_raw)
    out = apply_overrides(tiny_raw, ["trainer.lr=0.5", "data.synthetic.seed=3", "trainer.optimizer=adam",
                                     "data.augment=true", "trainer.focal_alpha=null"])
    assert out["trainer"]["lr"] == 0.5 and isinstance(out["trainer"]["lr"], float)
    assert out["data"]["synthetic"]["seed"] == 3 and isinstance(out["data"]["synthetic"]["seed"], int)
    assert out["trainer"]["optimizer"] == "adam"
    assert out["data"]["augment"] is True
    assert out["trainer"]["focal_alpha"] is None
    assert tiny_raw == before  # the input is not modified


def test_overrides_parse_lists_and_mappings(tiny_raw: dict) -> None:
    out = apply_overrides(tiny_raw, ["grid.seed=[0,1]", "grid.freeze={tiny_cnn: [block1, none]}"])
    assert out["grid"]["seed"] == [0, 1]
    assert out["grid"]["freeze"] == {"tiny_cnn": ["block1", "none"]}
    spec = validate(out)
    assert spec.grid.seed == [0, 1] and spec.freeze_levels() == {"tiny_cnn": ["block1", "none"]}


def test_overrides_create_missing_sections() -> None:
    out = apply_overrides({"name": "x", "ray": None}, ["ray.address=auto", "resources.gpu=1"])
    assert out == {"name": "x", "ray": {"address": "auto"}, "resources": {"gpu": 1}}


def test_later_override_wins(tiny_raw: dict) -> None:
    out = apply_overrides(tiny_raw, ["trainer.lr=0.1", "trainer.lr=0.2"])
    assert out["trainer"]["lr"] == 0.2


@pytest.mark.parametrize("item", ["trainer.lr", "", "=0.1", "grid.seed"])
def test_malformed_override_item(tiny_raw: dict, item: str) -> None:
    with pytest.raises(SpecError, match="key.path=value"):
        apply_overrides(tiny_raw, [item])


def test_override_through_a_non_section(tiny_raw: dict) -> None:
    with pytest.raises(SpecError, match=r"trainer\.lr\.x.*'lr' is not a section"):
        apply_overrides(tiny_raw, ["trainer.lr.x=1"])


def test_override_value_that_is_not_yaml(tiny_raw: dict) -> None:
    with pytest.raises(SpecError, match="grid.seed.*cannot parse"):
        apply_overrides(tiny_raw, ["grid.seed=[0,"])


# --- load_spec ---------------------------------------------------------------------------------

def write_yaml(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_load_spec_reads_yaml_and_applies_overrides(tiny_raw: dict, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", tiny_raw)
    spec = load_spec(path, ["grid.seed=[0,1]", "trainer.optimizer=adam", "grid.backbone=resnet18"])
    assert spec.grid.seed == [0, 1]
    assert spec.trainer.optimizer == "adam"
    assert spec.grid.backbone == ["resnet18"]
    assert load_spec(str(path)).grid.seed == [0]  # a str path, no overrides


def test_load_spec_validates_after_overrides(tiny_raw: dict, tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "s.yaml", tiny_raw)
    with pytest.raises(SpecError, match=r"(?s)trainer\.optimizer.*sgd.*adam"):
        load_spec(path, ["trainer.optimizer=rmsprop"])


def test_load_spec_of_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\ngrid: {backbone: tiny_cnn\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_load_spec_of_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


def test_load_spec_of_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match="name: required key is missing"):
        load_spec(path)


def test_load_spec_of_non_mapping_yaml(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_load_spec_of_non_mapping_yaml_with_overrides(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path, ["name=x"])


@pytest.mark.parametrize("axis,values",
                         [("seed", [0, 0]), ("lr", [0.01, 0.01]), ("backbone", ["tiny_cnn", "tiny_cnn"])])
def test_repeated_axis_values_are_rejected(tiny_raw, axis, values):
    tiny_raw["grid"][axis] = values
    with pytest.raises(SpecError, match=rf"grid\.{axis}: repeated value"):
        validate(tiny_raw)


def test_repeated_freeze_level_in_mapping_is_rejected(tiny_raw):
    tiny_raw["grid"]["freeze"] = {"tiny_cnn": ["none", "none"]}
    with pytest.raises(SpecError, match=r"grid\.freeze: repeated value"):
        validate(tiny_raw)



@pytest.mark.parametrize("key", ["feature_cache", "compile"])
@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_on_off_keys_accept_bare_yaml_on_off(tiny_raw, key, value):
    # YAML reads a bare on/off as a bool; --set parses its value as YAML too
    from covid_tune.spec.plan import expand
    raw = apply_overrides(tiny_raw, [f"trainer.{key}={value}"])
    assert getattr(validate(raw).trainer, key) == value
    assert {getattr(hp, key) for hp in expand(validate(raw)).values()} == {value}


def test_compile_rejects_other_values_naming_them(tiny_raw):
    with pytest.raises(SpecError, match=r"trainer\.compile.*'auto', 'on' or 'off'"):
        validate(apply_overrides(tiny_raw, ["trainer.compile=max"]))


def test_feature_cache_budget_reaches_the_plan_and_rejects_negatives(tiny_raw):
    from covid_tune.spec.plan import expand

    raw = apply_overrides(tiny_raw, ["trainer.feature_cache_gb=0.5"])
    assert {hp.feature_cache_gb for hp in expand(validate(raw)).values()} == {0.5}
    with pytest.raises(SpecError, match=r"trainer\.feature_cache_gb.*greater than or equal to 0"):
        validate(apply_overrides(tiny_raw, ["trainer.feature_cache_gb=-1"]))
