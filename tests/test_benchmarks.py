"""benchmarks/: the report's formatting on fabricated numbers and the command line (no training here)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import CXR_REAL, needs_cxr_real

REPO = Path(__file__).resolve().parents[1]
PARTS = ("loader", "head_cache", "gpu", "tune_overhead", "grid", "checkpoint", "outside")


def load_run():
    spec = importlib.util.spec_from_file_location("bench_run_t", REPO / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_goal_and_verdict_come_from_targets() -> None:
    bench = load_run()
    assert bench.goal("tune_overhead") == "<= 0.03"
    assert bench.verdict("tune_overhead", 0.029) == "met" and bench.verdict("tune_overhead", 0.031) == "MISSED"
    for key, (op, target) in bench.TARGETS.items():
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            assert bench.goal(key) == f"{op} {target:g}", key


def test_tune_overhead_row_shows_median_and_spread() -> None:
    bench = load_run()
    x = {"config": "resnet18-layer1 64 px, 4 epochs, 10+5 images, 1 CPU", "direct_s": [10.0, 10.2, 9.9],
         "trial_s": [10.1, 10.4, 10.0], "fixed_per_trial_s": 3.0, "tune_overhead": 0.0101,
         "tune_overhead_rounds": [0.0101, 0.0101, 0.0196], "tune_overhead_spread": (0.0101, 0.0196)}
    res = {"machine": {}, "results": {"tune_overhead": x}}
    row = next(line for line in bench.table(res).splitlines() if "[tune_overhead]" in line)
    assert "+0.010" in row and "median of 3" in row and "+0.010..+0.020" in row and "| met |" in row
    x["tune_overhead"] = 0.05
    row = next(line for line in bench.table(res).splitlines() if "[tune_overhead]" in line)
    assert "MISSED" in row and "steady" not in row
    large = {**x, "config": "resnet18-layer1", "epoch_overhead": 0.042, "checkpoint_mb": 88.4}
    res["results"].update(tune_overhead={**x, "epoch_overhead": -0.004}, tune_overhead_large=large)
    lines = bench.table(res).splitlines()
    assert "steady epochs -0.004" in next(line for line in lines if "[tune_overhead]" in line)
    row = next(line for line in lines if "the largest checkpoint" in line)
    assert "(88 MB per epoch)" in row and "+0.050 (steady epochs +0.042, spread +0.010..+0.020)" in row
    assert "[tune_overhead]" not in row and row.endswith("| | |")  # no goal of its own


def test_help_names_every_benchmark() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--help"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for part in PARTS:
        assert part in out.stdout, part


@needs_cxr_real
def test_selection_resplits_keep_patients_apart_and_cover_every_image_once_as_test() -> None:
    import pandas as pd

    from covid_tune.data.dataset import scan_dataset

    spec = importlib.util.spec_from_file_location("bench_selection_t", REPO / "benchmarks" / "selection.py")
    selection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selection)
    index = scan_dataset(CXR_REAL, {"covid": "infected", "pneumonia": "infected"}, verify=False)
    manifest = pd.read_csv(CXR_REAL / "manifest.csv")
    patient = {str((CXR_REAL / f).resolve()): g for f, g in zip(manifest["file"], manifest["patient_group"])}
    own_label = {p: y for items in index.splits.values() for p, y in items}
    tested = []
    for k in range(selection.FOLDS):
        cut = selection.resplit(index, k)
        groups = {s: {patient[str(Path(p).resolve())] for p in cut.paths(s)} for s in cut.splits}
        assert not groups["train"] & groups["test"] and not groups["validation"] & groups["test"]
        assert not groups["train"] & groups["validation"]
        assert sum(len(v) for v in cut.splits.values()) == len(manifest)
        assert all(own_label[p] == y for items in cut.splits.values() for p, y in items)  # labels travel along
        assert 150 <= len(cut.splits["test"]) <= 190 and cut.paths("test") != index.paths("test")
        covid = sum("/covid/" in p for p in cut.paths("test"))
        assert 20 <= covid <= 35  # stratified: about a sixth of the 166 covid images
        tested += cut.paths("test")
    assert sorted(tested) == sorted(own_label)  # the six test folds partition the pool
