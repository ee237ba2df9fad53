"""``--dry-run``: check everything a sweep needs without training or starting Ray, list every problem.

The trial grid, the data tree (splits, classes, file counts, unreadable files), the weights, this
machine's resources, the ASHA rungs and a disk estimate. Exit code 2 when anything is wrong.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from covid_tune import plan as plan_mod
from covid_tune.console import fmt_bytes, resources_text, scheduler_text
from covid_tune.engine import HParams
from covid_tune.spec import Spec


def _data(spec: Spec, problems: list[str]) -> tuple[list[str], list[str], int]:
    """Report lines on the data, its classes (after class_map) and its image count; problems appended."""
    from covid_tune.data import DatasetError, check_implies, scan_dataset
    from covid_tune.report import dataset_root

    if spec.data.synthetic is not None:
        s = spec.data.synthetic
        classes = sorted({spec.data.class_map.get(c, c) for c in s.classes})
        n = len(s.classes) * (s.train + s.validation + s.test)
        return [f"data: synthetic, generated under {dataset_root(spec)} at run time: classes {', '.join(s.classes)}; "
                f"per class train {s.train}, validation {s.validation}, test {s.test} ({n} images, {s.image_size} px)"
                ], classes, n
    root = dataset_root(spec)
    try:
        index = scan_dataset(root, spec.data.class_map, spec.data.on_bad_file)
    except DatasetError as exc:
        for p in exc.problems:  # a "(set data.on_bad_file: skip ...)" hint belongs to the problem before it
            if p.startswith("(") and problems:
                problems[-1] += " " + p
            else:
                problems.append(p)
        return [f"data: {root}: {len(exc.problems)} problem(s)"], [], 0
    try:
        check_implies(index.classes, spec.data.implies)
    except ValueError as exc:
        problems.append(str(exc))
    counts = index.counts()
    lines = [f"data: {root}: classes {', '.join(index.classes)}"
             + (f" (from folders {', '.join(index.original_classes)})" if index.original_classes != index.classes else "")]
    lines += [f"  {split}: {sum(c.values())} images (" + ", ".join(f"{k} {v}" for k, v in c.items()) + ")"
              for split, c in counts.items()]
    if index.skipped:
        lines.append(f"  {len(index.skipped)} unreadable file(s) left out (data.on_bad_file: skip)")
    lines += _duplicates(spec, index, problems)
    return lines, index.classes, sum(sum(c.values()) for c in counts.values())


def _duplicates(spec: Spec, index, problems: list[str]) -> list[str]:
    """Report lines on images of validation/test whose decoded pixels equal an earlier split's (read from
    the decoded cache when it is there, else decoded in memory: nothing is written); problems appended."""
    from covid_tune.cache import find_duplicates
    from covid_tune.data import DatasetError, drop_duplicates

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
    from covid_tune.models import WeightsUnavailable, check_weights, imagenet_weights_file
    from covid_tune.weights import offline_reason

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


def _resources(spec: Spec, n_trials: int, problems: list[str]) -> list[str]:
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return [f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpu:g} GPU per trial; the cluster's "
                "own resources are checked when the sweep starts"]
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    have = {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}
    for name, key, want in (("CPU", "resources.cpus", spec.resources.cpus), ("GPU", "resources.gpu", spec.resources.gpu)):
        if want > have[name]:
            problems.append(f"{key}={want:g} but this machine has {have[name]:g} {name}(s); use --set "
                            f"{key}={have[name]:g} or run on a cluster (--address)")
    if any(want > have[n] for n, want in (("CPU", spec.resources.cpus), ("GPU", spec.resources.gpu))):
        return [f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpu:g} GPU per trial; this machine has "
                f"{have['CPU']:g} CPU, {have['GPU']:g} GPU"]
    return ["resources: " + resources_text(spec.resources.cpus, spec.resources.gpu, have, n_trials,
                                           spec.ray.max_concurrent).replace("(Ray:", "(this machine:")]


def state_bytes(hp: HParams, num_classes: int) -> tuple[int, int]:
    """Bytes of one configuration's exported model (parameters and buffers, float32) and of one
    training checkpoint (the model plus optimizer state: SGD momentum 1x, Adam 2x the trainable
    parameters). Built on the meta device: nothing is allocated."""
    import torch

    from covid_tune.models import create_model

    with torch.device("meta"):
        model = create_model(hp.backbone, max(num_classes, 1), hp.freeze, "none", hp.head_hidden, hp.dropout)
    tensors = list(model.state_dict().values())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    factor = 2 if hp.optimizer == "adam" else (1 if hp.momentum > 0 else 0)
    return model_bytes, model_bytes + factor * trainable


def _disk(spec: Spec, plan: dict[str, HParams], num_classes: int, n_images: int) -> list[str]:
    from covid_tune.cache import node_memory_bytes

    keep = min(spec.trainer.epochs, spec.scheduler.keep_checkpoints + 1)  # the best k and the latest
    sizes: dict[tuple, tuple[int, int]] = {}
    ckpt = best = 0
    for hp in plan.values():
        key = (hp.backbone, hp.freeze, hp.head_hidden, hp.optimizer, hp.momentum > 0)
        if key not in sizes:
            sizes[key] = state_bytes(hp, num_classes)
        best += sizes[key][0]
        ckpt += keep * sizes[key][1]
    cache = node_memory_bytes(n_images, spec.data.image_size, spec.data.grayscale) if spec.data.cache else 0
    synth = 0
    if spec.data.synthetic is not None:
        synth = n_images * spec.data.synthetic.image_size ** 2  # PNG, at most about one byte a pixel
    total = ckpt + best + cache + synth
    parts = [f"ray/ checkpoints up to {fmt_bytes(ckpt)} (at most {keep} per trial)", f"best/ {fmt_bytes(best)}"]
    parts += [f"cache/ up to {fmt_bytes(cache)}"] if cache else []
    parts += [f"synthetic-data/ about {fmt_bytes(synth)}"] if synth else []
    return [f"disk: about {fmt_bytes(total)} under {spec.output_dir}: " + ", ".join(parts)]


def preflight(spec: Spec, plan: dict[str, HParams], resume: bool = False, overwrite: bool = False,
              exists: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the grid and every check (``out``), every problem at once (``err``); return 2 if any, else 0."""
    out, err = out or sys.stdout, err or sys.stderr
    problems: list[str] = []
    print(plan_mod.plan_table(plan), file=out)
    print(f"\n{len(plan)} trial(s); output: {spec.output_dir}", file=out)
    lines, classes, n_images = _data(spec, problems)
    lines += _weights(spec, problems)
    lines += _resources(spec, len(plan), problems)
    sched = spec.scheduler
    rungs, per_level = spec.asha_rung_epochs()
    lines.append("scheduler: " + scheduler_text(sched.asha, sched.metric, sched.mode, rungs, spec.trainer.epochs)
                 + per_level)
    lines += _disk(spec, plan, len(classes) or 2, n_images)
    if exists and not (resume or overwrite):
        problems.append(f"{spec.experiment_path} already holds a sweep named {spec.name!r}; a run needs --resume "
                        "to finish it or --overwrite to start again")
    elif resume and not exists:
        problems.append(f"--resume: no sweep named {spec.name!r} to restore at {spec.experiment_path}")
    print("\n".join(lines), file=out)
    if problems:
        print(f"covid_tune: pre-flight found {len(problems)} problem(s):\n"
              + "\n".join(f"  - {p}" for p in problems), file=err)
        return 2
    print(f"pre-flight: no problem found; {len(plan)} trial(s) ready", file=out)
    return 0
