"""The Ray Tune function trainable: one report (metrics + checkpoint) per epoch."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from ray import tune

from covid_tune.cache import DecodedSplits
from covid_tune.data import DatasetIndex
from covid_tune.engine import HParams, TrainingRun, default_device

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


def save_checkpoint(run: TrainingRun, metrics: dict, directory: Path) -> None:
    """What one checkpoint directory holds: the full training state and that epoch's metrics."""
    torch.save(run.state_dict(), directory / STATE_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics))


def train_trial(config: dict, plan: dict[str, HParams], index: DatasetIndex, cpus: float, gpu: float,
                decoded: DecodedSplits | None = None) -> None:
    """Train ``plan[config['config_id']]``, resuming from Tune's last checkpoint when there is one.

    ``decoded`` (the sweep's decoded cache, from Ray's object store: zero-copy, read-only, one copy
    per node) selects the tensor pipeline; without it the trial decodes with PIL. Each epoch's
    metrics also say which paths ran: ``decoded_cache``, ``feature_cache``, ``augmented`` (0/1).
    """
    hp = plan[config["config_id"]]
    torch.set_num_threads(max(1, int(cpus)))
    run = TrainingRun(hp, index, default_device(use_gpu=gpu > 0), decoded=decoded)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            run.load_state_dict(torch.load(Path(d) / STATE_FILE, map_location=run.device, weights_only=True))
    while run.epoch < hp.epochs:
        metrics = {**run.run_epoch(), **run.modes}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(run, metrics, Path(d))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
