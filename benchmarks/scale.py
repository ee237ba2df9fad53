#!/usr/bin/env python
"""Many short trials: covid_tune's whole run beside Ray Tune used directly, on the same tiny workload.

    python benchmarks/scale.py [--trials N] [--json FILE] [--keep DIR] [--only covid_tune|ray_tune]
    python benchmarks/scale.py --dry-run      # the spec and both sides' settings; runs nothing

Issue 36's workload: N trials of tiny_cnn, 2 epochs, synthetic data (150/40/40 images, 72 px cropped to
64), SGD, ASHA on val_loss with grace 1, 1 CPU per trial, grid lr [0.01, 0.001] x seed [0..N/2-1].

  covid_tune  ``covid-tune run`` in a subprocess (the real command: spec -> plan -> sweep -> test
              evaluation -> report, its own local Ray); its wall clock from start to exit, its phases
              (results.json ``timing``), the PNGs under report/, REPORT.md's size and results.csv's rows
  ray_tune    Ray Tune used directly in this process: a plain function trainable training the same CNN on
              the same images (decoded once here, shipped with ``tune.with_parameters``) for 2 epochs,
              ``tune.report(..., checkpoint=...)`` each epoch, the same ASHA, ``reuse_actors=True``,
              ``CheckpointConfig(num_to_keep=2)``; its wall clock includes ``ray.init``

Printed: both wall clocks, their ratio, the per-trial overhead ((covid_tune - ray_tune) / N) and
covid_tune's phases. The goals at N=256 (issue 36): ratio <= 2.5, <= 25% of covid_tune's wall clock
outside the trials, <= 60 PNGs, REPORT.md <= 100 KB, results.csv with every configuration.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks/common.py: see there
# Ray runs its workers at nice 15; on a shared machine both sides compete for the CPU on equal terms
os.environ.setdefault("RAY_worker_niceness", "0")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # covid_tune from this checkout (also for Ray's workers: PYTHONPATH below)

EPOCHS, BATCH, IMAGE, SOURCE = 2, 16, 64, 72
COUNTS = {"train": 150, "validation": 40, "test": 40}
LRS = (0.01, 0.001)
GOALS = {"ratio": 2.5, "outside_trials": 0.25, "pngs": 60, "report_kb": 100.0}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def python_path() -> str:
    """PYTHONPATH with this checkout first."""
    return os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def spec_yaml(trials: int) -> str:
    """The covid_tune spec of the workload (N = 2 learning rates x N/2 seeds)."""
    seeds = list(range(max(1, trials // 2)))
    return f"""name: scale
data:
  synthetic: {{classes: [infected, normal], train: {COUNTS['train']}, validation: {COUNTS['validation']}, \
test: {COUNTS['test']}, image_size: {SOURCE}, seed: 0}}
  image_size: {IMAGE}
  augment: false
grid:
  backbone: tiny_cnn
  freeze: none
  loss: ce
  lr: {list(LRS)}
  seed: {seeds}
trainer:
  epochs: {EPOCHS}
  optimizer: sgd
  momentum: 0.9
  batch_size: {BATCH}
  head_hidden: 64
  dropout: 0.2
  weights: none
scheduler:
  metric: val_loss
  grace_period: 1
  reduction_factor: 2
report:
  ensemble: none  # the seeds here only make N trials: Ray Tune used directly builds no 128-model ensemble
resources:
  cpus: 1
  gpu: 0
"""


def run_covid_tune(trials: int, work: Path) -> dict:
    """``covid-tune run`` of the workload in a subprocess; wall clock, phases and what the report holds."""
    spec = work / "scale.yaml"
    spec.write_text(spec_yaml(trials))
    out = work / "covid_tune"
    env = {**os.environ, "PYTHONPATH": python_path()}
    cmd = [sys.executable, "-m", "covid_tune", "run", str(spec), "--output", str(out), "--overwrite"]
    log(f"covid_tune: {trials} trials -> {out}")
    start = time.perf_counter()
    with open(work / "covid_tune.log", "wb") as f:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"covid-tune run failed (exit {proc.returncode}); see {work / 'covid_tune.log'}")
    report = out / "report"
    timing = json.loads((report / "results.json").read_text())["timing"]
    with open(report / "results.csv") as f:
        csv_rows = sum(1 for _ in f) - 1
    phases = timing["phases_s"]
    return {"wall_s": wall, "command_wall_s": timing["wall_s"], "phases_s": phases,
            # outside the trials, of the process's wall clock (interpreter start and imports included)
            "outside_trials": 1 - phases.get("trials", 0.0) / wall,
            "evaluated_during_trials": timing.get("evaluated_during_trials"),
            "pngs": sum(1 for _ in report.rglob("*.png")), "report_kb": (report / "REPORT.md").stat().st_size / 1024,
            "results_csv_rows": csv_rows,
            "output_mb": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6}


def load_images(root: Path, split: str) -> tuple:
    """One split of the synthetic tree as float tensors (N, 1, 64, 64) (72 px center-cropped) and labels."""
    import numpy as np
    from PIL import Image

    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    xs, ys = [], []
    off = (SOURCE - IMAGE) // 2
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            img = Image.open(path).convert("L").resize((SOURCE, SOURCE))
            xs.append(np.asarray(img, dtype=np.uint8)[off:off + IMAGE, off:off + IMAGE])
            ys.append(label)
    return np.stack(xs)[:, None], np.asarray(ys, dtype=np.int64)


def direct_trainable(config: dict, data: dict) -> None:
    """Ray Tune's plain function trainable: the same CNN, 2 epochs, a report and a checkpoint per epoch."""
    import torch
    from ray import tune

    from covid_tune.models.registry import create_model

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    model = create_model("tiny_cnn", 2, freeze="none", weights="none", head_hidden=64, dropout=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    to_x = lambda a: (torch.from_numpy(a).float() / 255.0 - 0.5) / 0.25  # noqa: E731
    xtr, ytr = to_x(data["train"][0]), torch.from_numpy(data["train"][1])
    xva, yva = to_x(data["validation"][0]), torch.from_numpy(data["validation"][1])
    if model_wants_rgb(model):
        xtr, xva = xtr.expand(-1, 3, -1, -1), xva.expand(-1, 3, -1, -1)
    for epoch in range(1, EPOCHS + 1):
        model.train()
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xva)
            val_loss = float(loss_fn(out, yva))
            val_acc = float((out.argmax(1) == yva).float().mean())
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       Path(d) / "checkpoint.pt")
            tune.report({"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch},
                        checkpoint=tune.Checkpoint.from_directory(d))


def model_wants_rgb(model) -> bool:
    import torch

    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return first.in_channels == 3


def run_ray_tune(trials: int, work: Path) -> dict:
    """Ray Tune used directly, in this process; the wall clock includes ``ray.init``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by a test
    from common import quiet

    from covid_tune.data.synthetic import make_synthetic

    root = make_synthetic(work / "synthetic", ("infected", "normal"), COUNTS, SOURCE, 0)
    data = {s: load_images(root, s) for s in ("train", "validation")}
    log(f"Ray Tune used directly: {trials} trials")
    os.environ["PYTHONPATH"] = python_path()  # Ray's workers import covid_tune's CNN from this checkout
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    start = time.perf_counter()
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    with quiet(work / "ray_tune.log"):  # Ray and Tune's progress output
        # a private local Ray (address="local"): never someone else's cluster on a shared machine
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        seeds = list(range(max(1, trials // 2)))
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(direct_trainable, data=data), {"cpu": 1}),
            param_space={"lr": tune.grid_search(list(LRS)), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", reuse_actors=True,
                                        scheduler=ASHAScheduler(time_attr="training_iteration", max_t=EPOCHS,
                                                                grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="direct", storage_path=str(work / "ray_tune"), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        grid = tuner.fit()
        wall = time.perf_counter() - start
        errors = sum(1 for r in grid if r.error)
        epochs = sum(int((r.metrics or {}).get("epoch") or 0) for r in grid)
        ray.shutdown()
    return {"wall_s": wall, "ray_init_s": init_s, "trials": len(grid), "errors": errors, "epochs_trained": epochs}


def summary(res: dict) -> str:
    """The side-by-side table (markdown)."""
    n = res["trials"]
    c, r = res.get("covid_tune"), res.get("ray_tune")
    lines = [f"| {n} trials | wall (s) | notes |", "|---|---|---|"]
    if r:
        lines.append(f"| Ray Tune used directly | {r['wall_s']:.1f} | ray.init {r['ray_init_s']:.1f} s, "
                     f"{r['epochs_trained']} epochs, {r['errors']} errors |")
    if c:
        ph = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in c["phases_s"].items())
        lines.append(f"| covid_tune | {c['wall_s']:.1f} | phases (s): {ph}; {c['outside_trials']:.0%} outside the "
                     f"trials (goal <= {GOALS['outside_trials']:.0%}) |")
        lines.append(f"| covid_tune report | | {c['pngs']} PNGs (goal <= {GOALS['pngs']}), REPORT.md "
                     f"{c['report_kb']:.0f} KB (goal <= {GOALS['report_kb']:.0f}), results.csv {c['results_csv_rows']} "
                     f"rows, output {c['output_mb']:.0f} MB |")
    if c and r:
        lines.append(f"| ratio | {res['ratio']:.2f}x | goal <= {GOALS['ratio']}; per-trial overhead "
                     f"{res['per_trial_overhead_s']:+.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=256, help="trials per side (default 256; even: lr x seeds)")
    p.add_argument("--only", choices=["covid_tune", "ray_tune"], help="run one side only")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, deleted)")
    p.add_argument("--dry-run", action="store_true", help="print the spec and settings; run nothing")
    args = p.parse_args(argv)
    if args.trials < 2 or args.trials % 2:
        p.error("--trials must be an even number >= 2 (2 learning rates x N/2 seeds)")
    if args.dry_run:
        print(spec_yaml(args.trials))
        print(f"# Ray Tune used directly: {args.trials} trials, lr {list(LRS)} x seed [0..{args.trials // 2 - 1}], "
              f"{EPOCHS} epochs, batch {BATCH}, {IMAGE} px, ASHA(val_loss, grace 1), reuse_actors=True, "
              "CheckpointConfig(num_to_keep=2)")
        return 0
    work = args.keep or Path(tempfile.mkdtemp(prefix="covid_tune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"trials": args.trials, "date": time.strftime("%Y-%m-%d %H:%M"), "cores": len(os.sched_getaffinity(0)),
                 "load_average_start": os.getloadavg()[0]}
    try:
        if args.only in (None, "covid_tune"):
            res["covid_tune"] = run_covid_tune(args.trials, work)
        if args.only in (None, "ray_tune"):
            res["ray_tune"] = run_ray_tune(args.trials, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res["load_average_end"] = os.getloadavg()[0]
    c, r = res.get("covid_tune"), res.get("ray_tune")
    if c and r:
        res["ratio"] = c["wall_s"] / r["wall_s"]
        res["per_trial_overhead_s"] = (c["wall_s"] - r["wall_s"]) / args.trials
    print(f"\nscale benchmark, {res['date']}: {res['cores']} cores, load average {res['load_average_start']:.1f} -> "
          f"{res['load_average_end']:.1f}\n")
    print(summary(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
