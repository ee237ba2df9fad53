"""One trial inside Ray Tune vs the same training called directly; checkpoint size; time outside trials."""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import CPU, REPO, Sizes, log, quiet, split_sizes, subset, timed

from covid_tune.data import cache as cache_mod
from covid_tune.data.dataset import DatasetIndex
from covid_tune.engine.hparams import HParams
from covid_tune.engine.training import TrainingRun


def saved_bytes(state: dict) -> int:
    """How many bytes ``torch.save`` writes for ``state`` (what a trial's checkpoint holds)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def bench_tune_overhead(index: DatasetIndex, s: Sizes, work: Path, tag: str = "") -> dict:
    """One trial's wall time inside Tune vs the same training called directly, taking turns.

    One CPU (one thread) each, as covid_tune runs CPU trials. ``tune_overhead`` compares the trial's
    own wall time (Tune's ``time_total_s``: from the trainable's start, with fetching the decoded
    cache from the object store, one report + checkpoint per epoch) with the direct run (model
    construction included in both). Starting the trial's worker process and Tune's book-keeping
    around ``Tuner.fit`` are a fixed cost per trial, reported in seconds beside it.
    """
    from ray import tune

    from covid_tune.sweep.trainable import train_trial

    if split_sizes(s.overhead_train, s.overhead_val):
        index = subset(index, split_sizes(s.overhead_train, s.overhead_val))
    decoded = cache_mod.build_decoded_cache(index, s.overhead_size, True, work / "overhead-cache",
                                            splits=("train", "validation"))
    hp = HParams(backbone=s.overhead_backbone, freeze=s.overhead_freeze, loss="ce", image_size=s.overhead_size,
                 batch_size=32, head_hidden=64, dropout=0.3, augment=True, lr=0.01, epochs=s.overhead_epochs)
    fn = tune.with_resources(tune.with_parameters(train_trial, plan={"one": hp}, index=index, cpus=1, gpu=0,
                                                  decoded=decoded), {"cpu": 1})

    checkpoint_bytes = []

    def direct() -> tuple[float, list[float]]:
        torch.set_num_threads(1)
        start = time.perf_counter()
        run = TrainingRun(hp, index, CPU, decoded=decoded)
        epochs = []
        while run.epoch < hp.epochs:
            epochs.append(timed(run.run_epoch)[0])
        total = time.perf_counter() - start
        if not checkpoint_bytes:
            checkpoint_bytes.append(saved_bytes(run.state_dict()))  # what the trial writes, Tune copies, per epoch
        return total, epochs

    def inside(i: int) -> tuple[float, float]:
        tuner = tune.Tuner(fn, param_space={"config_id": "one"},
                           run_config=tune.RunConfig(name=f"overhead{tag}{i}", storage_path=str(work / "ray"),
                                                     verbose=0,
                                                     checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        with quiet(work / "ray.log"):
            wall, grid = timed(tuner.fit)
        if grid[0].error:
            raise RuntimeError(f"the Tune trial failed: {grid[0].error}")
        assert grid[0].metrics["epoch"] == hp.epochs and grid[0].metrics["decoded_cache"] == 1
        return wall, grid[0].metrics["time_total_s"], list(grid[0].metrics_dataframe["time_this_iter_s"])

    # the arms take turns (direct first in even rounds, Tune first in odd ones) and each round gives one
    # paired ratio: a load change on the shared machine hits one pair, not one arm; the median of the
    # pairs is the figure and their spread is printed beside it, so a result at the edge of noise shows
    rounds = max(s.rounds, 3)
    direct_s, fit_s, trial_s, epochs = [], [], [], {"direct": [], "trial": []}

    def run_direct() -> None:
        total, per_epoch = direct()
        direct_s.append(total)
        epochs["direct"].append(per_epoch)

    def run_inside(i: int) -> None:
        wall, trial, per_epoch = inside(i)
        fit_s.append(wall)
        trial_s.append(trial)
        epochs["trial"].append(per_epoch)

    for i in range(rounds):
        order = "direct then inside Tune" if i % 2 == 0 else "inside Tune then direct"
        log(f"tune overhead ({hp.freeze}): round {i + 1}/{rounds}, {order}")
        if i % 2 == 0:
            run_direct()
            run_inside(i)
        else:
            run_inside(i)
            run_direct()
    ratios = sorted((t - d) / d for t, d in zip(trial_s, direct_s))
    # a fresh worker process warms up in its first epoch (and builds the model there): the epochs
    # after it are the per-epoch cost of a report + checkpoint alone
    steady = [sum(t[1:]) / sum(d[1:]) - 1 for t, d in zip(epochs["trial"], epochs["direct"])]
    return {"config": f"{hp.backbone}-{hp.freeze} {hp.image_size} px, {hp.epochs} epochs, "
                      f"{len(index.paths('train'))}+{len(index.paths('validation'))} images, 1 CPU",
            "direct_s": direct_s, "trial_s": trial_s, "tune_fit_s": fit_s, "epoch_s": epochs,
            "tune_overhead": statistics.median(ratios), "tune_overhead_rounds": ratios,
            "tune_overhead_spread": (ratios[0], ratios[-1]), "epoch_overhead": statistics.median(steady),
            "checkpoint_mb": checkpoint_bytes[0] / 1e6,
            "fixed_per_trial_s": statistics.median(f - t for f, t in zip(fit_s, trial_s)),
            "fit_overhead": statistics.median((f - d) / d for f, d in zip(fit_s, direct_s))}


# --- 3b. checkpoint size and the time outside trials --------------------------------------------------

def bench_checkpoint(index: DatasetIndex, work: Path) -> dict:
    """Bytes of one fc_only resnet18 checkpoint (after one epoch, so momentum exists): slim vs whole model."""
    hp = HParams(backbone="resnet18", freeze="fc_only", loss="ce", image_size=64, batch_size=16, head_hidden=64,
                 augment=False, epochs=1)
    run = TrainingRun(hp, subset(index, {"train": 32, "validation": 16}), CPU)
    run.run_epoch()

    slim = run.state_dict()
    whole = {**{k: v for k, v in slim.items() if k not in ("model_part", "frozen_digest")},
             "model": run.model.state_dict()}
    slim_bytes = saved_bytes(slim)
    return {"config": "resnet18 fc_only, head_hidden 64", "slim_bytes": slim_bytes, "full_bytes": saved_bytes(whole),
            "checkpoint_kb": slim_bytes / 1024}


def bench_outside(work: Path) -> dict:
    """sweeps/demo.yaml end to end in a subprocess; its results.json ``timing`` and what it left on disk
    (``disk_mb``: the output folder, ``ray/`` and ``best/``; the issue's goal for the demo is 150 MB)."""
    import subprocess

    out = work / "demo"
    cmd = [sys.executable, "-m", "covid_tune", "run", str(REPO / "sweeps" / "demo.yaml"), "--output", str(out),
           "--overwrite"]
    with open(work / "demo.log", "wb") as log_file:
        wall, proc = timed(lambda: subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT))
    if proc.returncode != 0:
        raise RuntimeError(f"the demo sweep failed (exit {proc.returncode}); see {work / 'demo.log'}")
    timing = json.loads((out / "report" / "results.json").read_text())["timing"]

    def mb(folder: Path) -> float:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6

    disk = {"total": mb(out), "ray": mb(out / "ray"), "best": mb(out / "best")}
    return {**timing, "process_wall_s": wall, "disk_mb": disk, "demo_disk_mb": disk["total"]}


# --- 4. the whole grid -----------------------------------------------------------------------------------
