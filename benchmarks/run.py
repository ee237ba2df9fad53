#!/usr/bin/env python
"""covid_tune's speed, measured side by side in one run on one machine.

    python benchmarks/run.py [--quick] [--json FILE] [--data DIR]
    python benchmarks/run.py --markdown [FILE]   # docs/benchmarks.md from benchmarks/recorded.py; runs nothing

Each line compares the plain way and covid_tune's way on the same data, in the same process
(or the same Ray session), one right after the other: timings on a shared machine swing between
runs, ratios taken minutes apart would not mean much.

  head_cache_speedup  head-only (fc_only) epoch: plain path (images through the frozen trunk every
                      epoch) vs training the head on features computed once (steady-state epoch;
                      the one-off extraction is reported beside it)
  loader_speedup      training input pipeline, images/s: PIL ImageFolder DataLoader with the course's
                      augmentation (the faster of 0 and N worker processes) vs the decoded cache with
                      tensor augmentation (the one-off cache build is reported beside it)
  tune_overhead       one trial inside Ray Tune (its own time, Ray already started: object store,
                      per-epoch report + checkpoint) vs the same training called directly; a fraction
                      of the direct time, median of alternating rounds; resnet18 fc_only (a checkpoint
                      of KBs), then the same for layer1 (~88 MB per epoch, no goal); "steady epochs":
                      epochs after the first only
  grid_speedup        a whole grid: the course's way (every configuration for every epoch, one after
                      another, PIL pipeline, all cores) vs covid_tune (ASHA, decoded + feature caches,
                      one trial per core; Ray start-up and cache build included); same_best_config:
                      whether both pick the same configuration (lowest validation loss of any epoch)
  checkpoint_kb       one fc_only resnet18 checkpoint (after an epoch: weights + momentum), what a trial
                      saves (trained part only) beside the whole model's state as it was saved before
  outside_trials      sweeps/demo.yaml end to end (a subprocess, its own local Ray): the fraction of the
                      wall clock outside Tune's trials, with every phase's seconds (results.json timing);
                      demo_disk_mb: the MB it leaves on disk (ray/ and best/ beside)
  gpu_mfu             on a GPU only: training images/s per backbone at 224 px (bf16 autocast,
                      channels_last, data on the GPU) and FLOPs/image x images/s / peak bf16 FLOP/s;
                      beside it the course's way on the same GPU (PIL DataLoader workers, float32)
  gpu_mfu_resnet18,   the same path under torch.compile (trainer.compile: on) at batch 128 and 256,
  gpu_mfu_vgg16       each arm's compile time; the better batch's MFU against the issue's goals

Run on their own (each starts its own Ray): benchmarks/scale.py (many short trials: covid_tune's whole
run beside Ray Tune used directly, issue 36), benchmarks/cxr_real.py, benchmarks/selection.py.

Data: the real chest X-rays in ../shared/cxr-real when present (covid + pneumonia -> infected),
else a generated synthetic set. ``--quick`` keeps every part small enough to finish in under five
minutes on two CPU cores.
"""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that wait sleep instead of spinning. On a machine shared with
# other jobs, a spinning two-thread process stalls whenever one core is taken (steps 10x slower);
# passive waiting costs an idle machine up to ~15% on two threads. Both sides run under it (Ray's
# workers inherit it). Set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path

import torch  # noqa: E402
from common import CXR_REAL, FULL, QUICK, REPO, TARGETS, goal, load_data, log, machine, quiet, table, timed, verdict  # noqa: E402,F401
from gpu import bench_gpu, flops_per_image  # noqa: E402,F401
from grid import bench_grid, best_of  # noqa: E402,F401
from head_cache import bench_head_cache  # noqa: E402
from loader import bench_loader, bench_loader_large  # noqa: E402
from recorded import READING, SECTIONS  # noqa: E402
from tune_overhead import bench_checkpoint, bench_outside, bench_tune_overhead  # noqa: E402

from covid_tune.data.dataset import scan_dataset  # noqa: E402

BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


def markdown() -> str:
    """docs/benchmarks.md: the recorded results (benchmarks/recorded.py), each goal and verdict from TARGETS."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    aim = lambda key: "same" if isinstance(TARGETS[key][1], bool) else goal(key)  # noqa: E731
    out = ["# Benchmarks", "",
           "<!-- generated by `python benchmarks/run.py --markdown` from benchmarks/recorded.py: edit those, "
           "not this file -->", "",
           "Generated by `python benchmarks/run.py --markdown` from the results recorded in "
           "[benchmarks/recorded.py](../benchmarks/recorded.py); the goals and verdicts come from `TARGETS` in "
           "[benchmarks/common.py](../benchmarks/common.py). `python benchmarks/run.py [--quick] [--only PART ...]` "
           "measures them again (its docstring says what each line compares); how the speed is made: "
           "[performance.md](performance.md).", "",
           "## Goals", "", "| key | goal |", "|---|---|"]
    out += [f"| {key} | {aim(key)} |" for key in TARGETS]
    for section in SECTIONS:
        out += ["", f"## {section['title']}", "", section["setup"][0].upper() + section["setup"][1:] + ".", "",
                "| measure | plain / course way | covid_tune | ratio [key] | goal | |", "|---|---|---|---|---|---|"]
        for measure, plain, ours, ratio, key, value in section["rows"]:
            judged = f"{ratio} [{key}] | {aim(key)} | {verdict(key, value)}" if key else f"{ratio} | | "
            out.append(f"| {cell(measure)} | {cell(plain)} | {cell(ours)} | {judged} |")
        for note in section["notes"]:
            out += ["", note]
    out += ["", "## Reading the numbers", ""] + [f"- {line}" for line in READING]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on 2 CPU cores")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--data", type=Path, help=f"ImageFolder tree to use (default: {CXR_REAL} when present)")
    p.add_argument("--only", nargs="*", choices=["loader", "head_cache", "gpu", "tune_overhead", "grid",
                                                 "checkpoint", "outside"],
                   help="run only these parts")
    p.add_argument("--rounds", type=int, help="repeats of the side-by-side measurements, fastest kept "
                                               "(default: 1 with --quick, else 2)")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, deleted)")
    p.add_argument("--markdown", type=Path, nargs="?", const=BENCHMARKS_MD, metavar="FILE",
                   help="measure nothing: write the recorded results (benchmarks/recorded.py) as Markdown to FILE "
                        f"(default {BENCHMARKS_MD.relative_to(REPO)})")
    args = p.parse_args(argv)
    if args.markdown:
        args.markdown.write_text(markdown())
        log(f"wrote {args.markdown}")
        return 0
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = replace(s, rounds=args.rounds)
    parts = set(args.only or ["loader", "head_cache", "gpu", "tune_overhead", "grid", "checkpoint", "outside"])
    cores = machine()["cores"] or 1
    torch.set_num_threads(cores)
    work = args.keep or Path(tempfile.mkdtemp(prefix="covid_tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    res: dict = {"machine": machine(), "mode": "quick" if args.quick else "full", "sizes": asdict(s), "results": {}}
    try:
        root, class_map, what = load_data(args.data, work)
        res["data"] = what
        index = scan_dataset(root, class_map)
        log(f"data: {what}: {', '.join(f'{k} {len(v)}' for k, v in index.splits.items())}; work folder {work}")
        if "loader" in parts:
            log("input pipeline")
            res["results"]["loader"] = bench_loader(index, s, work, cores)
            res["results"]["loader_large"] = bench_loader_large(s, work)
        if "head_cache" in parts:
            res["results"]["head_cache"] = bench_head_cache(index, s, work / "head-cache")
        if "checkpoint" in parts:
            log("checkpoint size")
            res["results"]["checkpoint"] = bench_checkpoint(index, work)
        if "outside" in parts:
            log("sweeps/demo.yaml end to end")
            res["results"]["outside"] = bench_outside(work)
        if "gpu" in parts and torch.cuda.is_available():
            log("GPU")
            res["results"]["gpu"] = bench_gpu(s, index, cores)
        if parts & {"tune_overhead", "grid"}:
            from covid_tune.sweep import tuning

            # Ray runs its workers at nice 15; on a machine shared with other jobs that alone would
            # slow the Tune side down, so both sides compete for the CPU on equal terms here
            os.environ.setdefault("RAY_worker_niceness", "0")
            log("starting Ray")
            import ray

            with quiet(work / "ray.log"):
                # a private local Ray: ray.init() without an address would join any cluster that
                # `ray start` left running on this machine (someone else's, on a shared one)
                ray_start_s, _ = timed(lambda: ray.init(address="local", include_dashboard=False,
                                                        object_store_memory=512 * 1024**2, log_to_driver=True))
            assert tuning.ray.is_initialized()
            res["results"]["ray_start_s"] = ray_start_s
            if "tune_overhead" in parts:
                res["results"]["tune_overhead"] = bench_tune_overhead(index, s, work)
                if s.overhead_large_freeze:
                    res["results"]["tune_overhead_large"] = bench_tune_overhead(
                        index, replace(s, overhead_freeze=s.overhead_large_freeze), work, tag="large")
            if "grid" in parts:
                res["results"]["grid"] = bench_grid(root, class_map, s, work, cores, ray_start_s)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    res["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["total_s"] = time.perf_counter() - started
    r = res["results"]
    res["ratios"] = {
        "head_cache_speedup": r.get("head_cache", {}).get("head_cache_speedup"),
        "loader_speedup": r.get("loader", {}).get("loader_speedup"),
        "tune_overhead": r.get("tune_overhead", {}).get("tune_overhead"),
        "grid_speedup": r.get("grid", {}).get("grid_speedup"),
        "same_best_config": r.get("grid", {}).get("same_best_config"),
        "gpu_mfu": r.get("gpu", {}).get("gpu_mfu"),
        "gpu_mfu_compiled": r.get("gpu", {}).get("gpu_mfu_compiled"),
        "checkpoint_kb": r.get("checkpoint", {}).get("checkpoint_kb"),
        "outside_trials": r.get("outside", {}).get("outside_trials"),
        "demo_disk_mb": r.get("outside", {}).get("demo_disk_mb"),
    }
    m = res["machine"]
    print(f"\ncovid_tune benchmarks ({res['mode']}), {time.strftime('%Y-%m-%d')}: {m['cores']} cores ({m['cpu']}), "
          f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, Ray {m.get('ray', '-')}; "
          f"load average {m['load_average_start']:.1f} -> {m['load_average_end']:.1f}; data: {res['data']}; "
          f"{res['total_s']:.0f} s in all\n")
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
