"""``--dry-run``: check everything a sweep needs without training or starting Ray, list every problem.

The trial grid, the data tree (splits, classes, file counts, unreadable files), the weights, this
machine's resources, the ASHA rungs and a disk estimate. Exit code 2 when anything is wrong.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TextIO

from covid_tune.cli.console import fmt_bytes, resources_text, scheduler_text
from covid_tune.engine.files import file_bytes_once
from covid_tune.engine.hparams import HParams
from covid_tune.spec import plan as plan_mod
from covid_tune.spec.load import Spec


def _data(spec: Spec, problems: list[str]) -> tuple[list[str], list[str], int]:
    """Report lines on the data, its classes (after class_map) and its image count; problems appended."""
    from covid_tune.data.dataset import DatasetError, check_implies
    from covid_tune.report.build import dataset_root, scan_data
    from covid_tune.results.clinical import positive_class

    if spec.data.synthetic is not None:
        s = spec.data.synthetic
        classes = sorted({spec.data.class_map.get(c, c) for c in s.classes})
        n = len(s.classes) * (s.train + s.validation + s.test)
        return [f"data: synthetic, generated under {dataset_root(spec)} at run time: classes {', '.join(s.classes)}; "
                f"per class train {s.train}, validation {s.validation}, test {s.test} ({n} images, {s.image_size} px)"
                ], classes, n
    root = Path(spec.data.labels) if spec.data.labels else dataset_root(spec)
    try:
        index = scan_data(spec)
    except DatasetError as exc:
        for p in exc.problems:  # a "(set data.on_bad_file: skip ...)" hint belongs to the problem before it
            if p.startswith("(") and problems:
                problems[-1] += " " + p
            else:
                problems.append(p)
        return [f"data: {root}: {len(exc.problems)} problem(s)"], [], 0
    try:
        check_implies(index.classes, spec.data.implies)
        if spec.data.label_mode == "single":
            positive_class(index.classes, spec.report.positive)
    except ValueError as exc:
        problems.append(str(exc))
    counts = index.counts()
    renamed = index.original_classes != index.classes
    lines = [f"data: {root}: classes {', '.join(index.classes)}"
             + (f" (from folders {', '.join(index.original_classes)})" if renamed else "")]
    lines += [f"  {split}: {len(index.splits[split])} images (" + ", ".join(f"{k} {v}" for k, v in c.items()) + ")"
              for split, c in counts.items()]
    if index.skipped:
        lines.append(f"  {len(index.skipped)} unreadable file(s) left out (data.on_bad_file: skip)")
    lines += _duplicates(spec, index, problems)
    lines += _folds(spec, index, problems)
    return lines, index.classes, sum(len(v) for v in index.splits.values())


def _folds(spec: Spec, index, problems: list[str]) -> list[str]:
    """Report lines on the cross-validation folds (``data.folds``): each fold's images, groups and classes;
    a group in both test and train/validation is a problem."""
    from covid_tune.data.folds import FoldError, fold_table, with_folds

    d = spec.data
    if not d.folds:
        return []
    try:
        with_folds(index, d.folds, d.group_by, d.fold_seed)
    except FoldError as exc:
        problems.append(str(exc))
        return [f"folds: {d.folds} by {d.group_by}: refused"]
    return [f"folds: {d.folds} of train + validation by {d.group_by} (seed {d.fold_seed}); test kept out"
            ] + fold_table(index, d.group_by)


def _duplicates(spec: Spec, index, problems: list[str]) -> list[str]:
    """Report lines on images of validation/test whose decoded pixels equal an earlier split's (read from
    the decoded cache when it is there, else decoded in memory: nothing is written); problems appended."""
    from covid_tune.data.cache import find_duplicates
    from covid_tune.data.dataset import DatasetError, drop_duplicates

    dups = find_duplicates(index, spec.data.image_size, spec.data.grayscale,
                           cache_dir=spec.output_dir / "cache" if spec.data.cache else None, store=False)
    action = spec.data.on_duplicate
    if not dups.total:
        return [f"  duplicates: {dups.summary()} (decoded pixels compared)"]
    lines = [f"  duplicates: {dups.summary()} (data.on_duplicate: {action}"
             + {"warn": ", kept", "drop": ", removed from the later split at run time", "error": ""}[action] + ")"]
    lines += [f"    {e}" for e in dups.examples(5)]
    if action == "error":
        problems.append(f"data.on_duplicate: error and {dups.summary()} (listed above; warn keeps them, drop removes "
                        "them from the later split)")
    elif action == "drop":
        try:
            drop_duplicates(index, dups)
        except DatasetError as exc:
            problems += exc.problems
    return lines


def _weights(spec: Spec, problems: list[str]) -> list[str]:
    from covid_tune.models.registry import WeightsUnavailable
    from covid_tune.models.weights import check_weights, imagenet_weights_file, offline_reason

    if spec.trainer.weights == "none":
        return ["weights: none (random initialisation)"]
    offline = offline_reason(spec.trainer.weights_download)
    found, download, missing = [], [], []
    for backbone in spec.grid.backbone:
        try:
            check_weights(backbone, spec.trainer.weights)
            found.append(backbone)
        except WeightsUnavailable as exc:
            if spec.trainer.weights == "imagenet" and offline is None:
                # the run downloads it (hash checked) into torchvision's cache before any trial
                download.append(f"{backbone} -> {imagenet_weights_file(backbone)}")
            else:
                problems.append(str(exc) + (f" (downloads are off: {offline})" if offline else ""))
                missing.append(backbone)
    return [f"weights: {spec.trainer.weights}: found for {', '.join(found) or 'no backbone'}"
            + (f"; downloaded on the first run for {', '.join(download)}" if download else "")
            + (f"; missing for {', '.join(missing)}" if missing else "")]


def local_resources() -> dict[str, float]:
    """The CPUs (this process may use) and GPUs (torch sees) of this machine."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def resource_problems(spec: Spec) -> list[str]:
    """A trial size this machine cannot hold (a local Ray would wait forever); none when joining a cluster,
    whose autoscaler may still add nodes (Ray's own check, :func:`covid_tune.sweep.cluster.check_resources`, runs
    at start). Checked before anything is written."""
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return []
    have = local_resources()
    return [f"{key}={want:g} but this machine has {have[name]:g} {name}(s); use --set {key}={have[name]:g} or "
            "run on a cluster (--address)"
            for name, key, want in (("CPU", "resources.cpus", spec.resources.cpus),
                                    ("GPU", "resources.gpu", spec.resources.gpu)) if want > have[name]]


def _resources(spec: Spec, n_trials: int, problems: list[str]) -> list[str]:
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return [f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpu:g} GPU per trial; the cluster's "
                "own resources are checked when the sweep starts"]
    have = local_resources()
    lacking = resource_problems(spec)
    problems += lacking
    if lacking:
        return [f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpu:g} GPU per trial; this machine has "
                f"{have['CPU']:g} CPU, {have['GPU']:g} GPU"]
    return ["resources: " + resources_text(spec.resources.cpus, spec.resources.gpu, have, n_trials,
                                           spec.ray.max_concurrent).replace("(Ray:", "(this machine:")]


ADDRESS_TIMEOUT_S = 10.0


def address_problem(address: str | None) -> str | None:
    """Why the Ray address (``--address``, ``ray.address`` or ``RAY_ADDRESS``) cannot be joined, found
    without Ray: a Ray Client (``ray://``) address, or a HOST:PORT nothing answers at within
    :data:`ADDRESS_TIMEOUT_S` (``ray.init`` would retry it for minutes). None: try it (``auto`` is left to Ray)."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return None
    if address.startswith("ray://"):
        return (f"--address {address}: Ray Client (ray://) addresses are not supported; submit the sweep as a job "
                "instead (ray job submit --address http://HEAD:8265 -- covid-tune run SPEC), or run it on "
                "the head node with --address auto")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        return (f"--address {address}: no Ray cluster answers there ({exc.strerror or type(exc).__name__ or exc}); "
                "start one (ray start --head), check the head's HOST:PORT, or leave out --address and RAY_ADDRESS "
                "to start Ray locally")
    return None


def state_bytes(hp: HParams, num_classes: int) -> tuple[int, int, int]:
    """Bytes of one configuration's exported model (parameters and buffers, float32), of the trained
    part a checkpoint holds of it (:mod:`covid_tune.engine.checkpoints`) and of its optimizer state (SGD
    momentum 1x, Adam 2x the trainable parameters). Built on the meta device: nothing is allocated."""
    import torch

    from covid_tune.models.freeze import trained_state
    from covid_tune.models.registry import create_model

    with torch.device("meta"):
        model = create_model(hp.backbone, max(num_classes, 1), hp.freeze, "none", hp.head_hidden, hp.dropout)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(t.numel() * t.element_size() for t in trained_state(model).values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    factor = 2 if hp.optimizer == "adam" else (1 if hp.momentum > 0 else 0)
    return model_bytes, trained, factor * trainable


# what Tune leaves per trial besides checkpoints (params.json, result.json, progress.csv, TensorBoard
# events, a finished trial's state without weights): measured on the demo, ~25-45 KB per trial of 6 epochs
TRIAL_FILES_BYTES = 40_000


def concurrent_trials(spec: Spec, n_trials: int) -> int:
    """How many trials may run at once: ``ray.max_concurrent``, else as many as this machine's CPUs hold
    (a cluster's size is unknown here: every trial)."""
    if spec.ray.max_concurrent:
        return min(n_trials, spec.ray.max_concurrent)
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return n_trials
    return max(1, min(n_trials, int(local_resources()["CPU"] // spec.resources.cpus)))


def _sizes(hp: HParams, num_classes: int, sizes: dict[tuple, tuple[int, int, int]]) -> tuple[int, int, int]:
    key = (hp.backbone, hp.freeze, hp.head_hidden, hp.optimizer, hp.momentum > 0)
    if key not in sizes:
        sizes[key] = state_bytes(hp, num_classes)
    return sizes[key]


def exported_bytes(plan: dict[str, HParams], num_classes: int,
                   sizes: dict[tuple, tuple[int, int, int]] | None = None) -> int:
    """Bytes of best/'s models: each configuration's trained part, and its frozen layers once per distinct
    initial weights (:func:`covid_tune.models.registry.save_exported` links equal ones): a seed's random
    init, or the pretrained weights whatever the seed. An ensemble's members are links: nothing more."""
    sizes = {} if sizes is None else sizes
    best, frozen_parts = 0, set()
    for hp in plan.values():
        model, trained, _ = _sizes(hp, num_classes, sizes)
        shared = (hp.backbone, hp.freeze, hp.weights, hp.seed if hp.weights == "none" else None)
        best += trained + (model - trained) * (shared not in frozen_parts)
        frozen_parts.add(shared)
    return best


def disk_estimate(spec: Spec, plan: dict[str, HParams], num_classes: int, n_images: int) -> tuple[int, list[str]]:
    """About how many bytes the sweep leaves under its output folder, and the parts (text).

    Each configuration's exported model (best/: :func:`exported_bytes`), Tune's small files per trial (a
    finished trial's checkpoint gives its weights up once best/ holds the chosen epoch), the decoded cache
    and generated data. While trials run, each also holds its latest ``keep_checkpoints`` checkpoints' trained part with
    the optimizer state, and the selected epoch's: :func:`running_bytes`, named in the text, not counted."""
    from covid_tune.data.cache import node_memory_bytes

    sizes: dict[tuple, tuple[int, int, int]] = {}
    best = exported_bytes(plan, num_classes, sizes)
    ray = TRIAL_FILES_BYTES * len(plan)
    cache = node_memory_bytes(n_images, spec.data.image_size, spec.data.grayscale) if spec.data.cache else 0
    synth = 0
    if spec.data.synthetic is not None:
        synth = n_images * spec.data.synthetic.image_size ** 2  # PNG, at most about one byte a pixel
    running = running_bytes(spec, plan, num_classes, sizes)
    parts = [f"best/ {fmt_bytes(best)} (each configuration's model)",
             f"ray/ about {fmt_bytes(ray)} once finished (up to {fmt_bytes(running)} more while trials run: "
             "their checkpoints)"]
    parts += [f"cache/ up to {fmt_bytes(cache)}"] if cache else []
    parts += [f"synthetic-data/ about {fmt_bytes(synth)}"] if synth else []
    return best + ray + cache + synth, parts


def running_bytes(spec: Spec, plan: dict[str, HParams], num_classes: int,
                  sizes: dict[tuple, tuple[int, int, int]] | None = None) -> int:
    """The most the running trials' checkpoints hold at once: per trial its latest ``keep_checkpoints``
    trained parts with the optimizer state and the selected epoch's trained part, for the largest trials
    that may run together (:func:`concurrent_trials`)."""
    sizes = {} if sizes is None else sizes
    keep = min(spec.trainer.epochs, spec.scheduler.keep_checkpoints)
    per_trial = []
    for hp in plan.values():
        _, trained, optim = _sizes(hp, num_classes, sizes)
        per_trial.append(keep * (trained + optim) + (hp.epochs > 1) * trained)
    return sum(sorted(per_trial, reverse=True)[:concurrent_trials(spec, len(plan))])


def _disk(spec: Spec, plan: dict[str, HParams], num_classes: int, n_images: int) -> list[str]:
    total, parts = disk_estimate(spec, plan, num_classes, n_images)
    return [f"disk: about {fmt_bytes(total)} under {spec.output_dir}: " + ", ".join(parts)]


def data_size(spec: Spec) -> tuple[int, int] | None:
    """Number of classes and images of the spec's data, from the spec (synthetic) or a listing of the
    tree (no image decoded); None where the tree cannot be read (its problems are reported elsewhere)."""
    from covid_tune.data.dataset import DatasetError
    from covid_tune.report.build import scan_data

    if spec.data.synthetic is not None:
        s = spec.data.synthetic
        classes = {spec.data.class_map.get(c, c) for c in s.classes}
        return len(classes), len(s.classes) * (s.train + s.validation + s.test)
    try:
        with warnings.catch_warnings():  # skipped entries are named by the real scan
            warnings.simplefilter("ignore")
            index = scan_data(spec, "skip", verify=False)
    except DatasetError:
        return None
    return len(index.classes), sum(len(v) for v in index.splits.values())


def _bytes_under(folder: Path) -> int:
    return file_bytes_once(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)


def disk_problem(spec: Spec, needed: int) -> str | None:
    """Why the output folder's filesystem cannot take ``needed`` bytes (the pre-flight estimate, less what
    the folder already holds: a resumed sweep or a kept cache), or None."""
    out = spec.output_dir
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return None  # no folder to ask (reported as an output problem)
    already = _bytes_under(out) if out.is_dir() else 0
    need = needed - already
    if free >= need:
        return None
    return (f"not enough disk space: the sweep needs about {fmt_bytes(need)} under {out} (pre-flight estimate "
            f"{fmt_bytes(needed)}" + (f", less {fmt_bytes(already)} already there" if already else "")
            + f") but its filesystem has {fmt_bytes(free)} free; free some space, or choose another output folder "
            "(--output) or fewer trials")


def start_problems(spec: Spec, plan: dict[str, HParams], num_classes: int, n_images: int) -> list[str]:
    """What stops a sweep before anything is written, besides its spec, data and resources: an output
    folder that cannot hold it, less free disk space than the estimate (when ``n_images`` is known), a
    cluster address nothing answers at. The run and the dry run both ask this."""
    from covid_tune.cli.output_dir import location_problem

    problems = []
    where = location_problem(spec)
    if where:
        problems.append(where)
    elif n_images:
        # room for the running trials' checkpoints too, not only for what the sweep leaves
        full = disk_problem(spec, disk_estimate(spec, plan, num_classes, n_images)[0]
                            + running_bytes(spec, plan, num_classes))
        problems += [full] if full else []
    unreachable = address_problem(spec.ray.address)
    return problems + ([unreachable] if unreachable else []) + tracking_problems(spec)


# a database store needs SQLAlchemy, which mlflow-skinny leaves out
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def tracking_problems(spec: Spec) -> list[str]:
    """A tracker the spec names whose package is not installed (found without importing it)."""
    from importlib.util import find_spec

    problems = []
    if spec.tracking.mlflow is not None:
        if find_spec("mlflow") is None:
            problems.append("tracking.mlflow needs the mlflow package, not installed here: "
                            "pip install 'covid_tune[mlflow]' (or leave out tracking.mlflow)")
        elif (spec.tracking.mlflow.resolved_uri(spec.output_dir).split(":")[0].split("+")[0] in MLFLOW_DATABASES
              and find_spec("sqlalchemy") is None):
            problems.append(f"tracking.mlflow.uri {spec.tracking.mlflow.uri}: a database store needs the full mlflow "
                            "package (pip install mlflow), not mlflow-skinny; or use a folder (a file store) or a "
                            "server (http://...)")
    if spec.tracking.wandb is not None and find_spec("wandb") is None:
        problems.append("tracking.wandb needs the wandb package, not installed here: "
                        "pip install 'covid_tune[wandb]' (or leave out tracking.wandb)")
    return problems


def _tracking(spec: Spec) -> list[str]:
    """The dry run's line on the trackers the sweep logs to."""
    t, parts = spec.tracking, []
    if t.mlflow is not None:
        parts.append(f"MLflow {t.mlflow.resolved_uri(spec.output_dir)} (experiment {t.mlflow.experiment or spec.name})")
    if t.wandb is not None:
        from covid_tune.engine.files import WANDB_FOLDER

        where = Path(t.wandb.dir).resolve() if t.wandb.dir else spec.output_dir
        parts.append(f"W&B project {t.wandb.project}, {t.wandb.mode}" + (f", runs in {where / WANDB_FOLDER}"
                                                                      if t.wandb.mode == "offline" else ""))
    return [f"tracking: {'; '.join(parts)}"] if parts else []


def preflight(spec: Spec, plan: dict[str, HParams], resume: bool = False, overwrite: bool = False,
              exists: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the grid and every check (``out``), every problem at once (``err``); return 2 if any, else 0."""
    out, err = out or sys.stdout, err or sys.stderr
    problems: list[str] = []
    print(plan_mod.plan_table(plan, spec), file=out)
    searched = plan_mod.search_summary(spec, plan)
    if searched:
        print("\n" + searched, file=out)
    print(f"\n{len(plan)} trial(s); output: {spec.output_dir}", file=out)
    lines, classes, n_images = _data(spec, problems)
    lines += _weights(spec, problems)
    lines += _resources(spec, len(plan), problems)
    sched = spec.scheduler
    rungs, per_level = spec.asha_rung_epochs()
    lines.append("scheduler: " + scheduler_text(sched.asha, sched.metric, sched.mode, rungs, spec.trainer.epochs)
                 + per_level)
    lines += _disk(spec, plan, len(classes) or 2, n_images)
    lines += _tracking(spec)
    problems += start_problems(spec, plan, len(classes) or 2, n_images)
    if exists and not (resume or overwrite):
        problems.append(f"{spec.experiment_path} already holds a sweep named {spec.name!r}; a run needs --resume "
                        "to finish it or --overwrite to start again")
    elif exists and overwrite:
        from covid_tune.cli.output_dir import overwrite_problem

        refused = overwrite_problem(spec)
        problems += [refused] if refused else []
    elif resume and not exists:
        problems.append(f"--resume: no sweep named {spec.name!r} to restore at {spec.experiment_path}")
    print("\n".join(lines), file=out)
    if problems:
        print(f"covid_tune: pre-flight found {len(problems)} problem(s):\n"
              + "\n".join(f"  - {p}" for p in problems), file=err)
        return 2
    print(f"pre-flight: no problem found; {len(plan)} trial(s) ready", file=out)
    return 0
