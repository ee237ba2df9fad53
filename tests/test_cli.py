"""The command line: --help, --dry-run, and bad input stopped with exit code 2 before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, load_sweep


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tune", "run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_option() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--set", "--dry-run", "--address", "--resume", "--overwrite", "--output"):
        assert option in proc.stdout


def test_dry_run_applies_set_overrides(tmp_path: Path) -> None:
    proc = run_cli("sweeps/demo.yaml", "--dry-run", "--set", "grid.seed=[0,1,2]", "--set", "grid.backbone=tiny_cnn",
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "8 trial(s)" not in proc.stdout and "12 trial(s)" in proc.stdout
    assert "resnet18" not in proc.stdout and "tiny_cnn-none-ce-lr0.01-s2" in proc.stdout


def test_dry_run_without_data_lists_the_grid_and_exits_2(tmp_path: Path) -> None:
    # every shipped spec's dry run with its data present: tests/test_sweeps.py
    proc = run_cli("sweeps/part1.yaml", "--dry-run", "--set", f"data.root={tmp_path / 'absent'}",
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "data folder does not exist" in proc.stderr, proc.stderr
    assert "8 trial(s)" in proc.stdout  # the grid is listed even though the pre-flight fails


def test_bad_spec_exits_2_naming_key_and_allowed_values(tmp_path: Path) -> None:
    proc = run_cli("sweeps/demo.yaml", "--set", "trainer.optimizer=rmsprop", "--set", "grid.backbone=[vgg19]",
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "trainer.optimizer" in proc.stderr and "'sgd'" in proc.stderr and "'adam'" in proc.stderr
    assert "grid.backbone" in proc.stderr and "resnet18" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_spec_file_exits_2() -> None:
    proc = run_cli("sweeps/no-such.yaml")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_bad_dataset_exits_2_before_ray_starts(tmp_path: Path, image_folder) -> None:
    root = image_folder(classes=("infected", "normal"), n=2)
    (root / "train" / "normal" / "notes.txt").write_text("not an image")
    raw = load_sweep("demo.yaml")
    raw["data"] = {"root": str(root), "image_size": 32}
    raw["output"] = str(tmp_path / "out")
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    proc = run_cli(str(spec))
    assert proc.returncode == 2
    assert "notes.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "ray").exists()


def test_missing_imagenet_weights_exits_2_with_the_file_to_place(tmp_path: Path, image_folder) -> None:
    root = image_folder(classes=("infected", "normal"), n=2)
    raw = load_sweep("demo.yaml")
    raw["data"] = {"root": str(root), "image_size": 32}
    raw["grid"]["backbone"] = ["resnet18"]
    raw["trainer"]["weights"] = "imagenet"
    raw["output"] = str(tmp_path / "out")
    spec = tmp_path / "w.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env_home = tmp_path / "torch-home"
    proc = subprocess.run([sys.executable, "-m", "covid_tune", "run", str(spec)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "TORCH_HOME": str(env_home),
                                                       "COVID_TUNE_OFFLINE": "1"})  # online it would download
    assert proc.returncode == 2
    assert "downloads are off (COVID_TUNE_OFFLINE=1)" in proc.stderr
    assert "resnet18-f37072fd.pth" in proc.stderr
    assert str(env_home / "hub" / "checkpoints") in proc.stderr


def test_the_command_lists_its_subcommands_and_refuses_unknown_ones(capsys) -> None:
    from covid_tune.cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "exit codes" in out
    assert main([]) == 2  # no command: the usage, and the exit code of bad input
    assert main(["sweeps/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'sweeps/demo.yaml' (a spec? covid-tune run sweeps/demo.yaml); choose from run" in err
    assert main(["frobnicate"]) == 2
    assert "choose from run, report, predict, export" in capsys.readouterr().err
