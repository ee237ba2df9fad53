"""``covid-tune run SPEC``: the whole sweep, from spec to report.

spec -> plan -> (data and weights checked) -> Ray Tune trials -> best checkpoints -> test
evaluation as Ray tasks -> OUTPUT/report/REPORT.md. Exit codes: 0 done, 1 a trial failed,
2 bad spec, data or weights (nothing started), 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM.

Only the standard library is imported at the top: ``--help`` and ``--version`` answer without
loading torch or Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from covid_tune.data.cache import DecodedSplits
    from covid_tune.data.dataset import DatasetIndex
    from covid_tune.spec.load import Spec

from covid_tune.cli.main import setup_logging, verbosity_options

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  covid-tune run sweeps/demo.yaml                  the demo (synthetic data, 8 trials)
  covid-tune run sweeps/part1.yaml --set data.root=/data/part1 --dry-run
                                                             pre-flight: grid, data, weights, disk
  covid-tune run sweeps/demo.yaml --set trainer.epochs=2 --set grid.seed=[0,1] --overwrite
  covid-tune run sweeps/demo.yaml --resume         finish an interrupted sweep
  covid-tune report runs/demo                      rebuild the report without training

exit codes:
  0  done (or --dry-run found no problem)
  1  at least one trial failed (the report covers the others)
  2  bad spec, data, weights, resources, output folder, --address or disk space: nothing was trained
  130, 143  interrupted by SIGINT (Ctrl-C) or SIGTERM: trials.json marks the unfinished trials,
            no report is written; --resume finishes them
"""


PHASES = ("startup", "cache", "ray_start", "trials", "evaluation", "report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="covid-tune run",
        description="Run a sweep of chest X-ray classifiers on Ray Tune (local Ray, or a cluster with "
                    "--address / RAY_ADDRESS) and write OUTPUT/report/REPORT.md.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", type=Path, help="YAML sweep spec, e.g. sweeps/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (repeatable), e.g. --set trainer.epochs=2 --set grid.seed=[0,1]")
    p.add_argument("--dry-run", action="store_true",
                   help="pre-flight without training: the trial grid, data tree, weights, resources, ASHA "
                        "rungs and a disk estimate; every problem listed, exit 2 if any")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start Ray locally)")
    p.add_argument("--output", help="output folder (default: the spec's output, else runs/<name>)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="restore an interrupted sweep in the output folder and finish it")
    group.add_argument("--overwrite", action="store_true",
                       help="delete an earlier sweep in the output folder and start again (once the "
                            "data and weights passed their checks)")
    verbosity_options(p)
    return p.parse_args(argv)


def quiet_ray_environment() -> None:
    """Ray's documented switches for a compact console, for this process and the Ray it starts (set here,
    in the command, before Ray is imported; a user's own settings win)."""
    # Tune's newer console prints its experiment box and folders even at verbose=0; the older one
    # prints nothing at verbose=0
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's repeated "Experiment state snapshotting ..." advice (3 lines each) on a busy machine
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def prepare(spec: Spec) -> tuple[DatasetIndex, DecodedSplits | None, dict[str, dict]]:
    """Check everything a trial needs before Ray starts: data (generated if synthetic) and pretrained
    weights (read from torchvision's cache or a file, downloaded if missing, checked against each
    backbone: here, once, never on a worker); then build (or read back) the decoded-image cache.

    Returns the index, the decoded cache and each backbone's pretrained state_dict (empty for
    ``weights: none``)."""
    from covid_tune.data.dataset import check_implies
    from covid_tune.data.synthetic import make_synthetic
    from covid_tune.models.weights import load_all
    from covid_tune.report import build as report_mod
    from covid_tune.results.clinical import positive_class

    if spec.data.synthetic is not None:
        s = spec.data.synthetic
        log.info(f"synthetic data -> {report_mod.dataset_root(spec)}")
        make_synthetic(report_mod.dataset_root(spec), s.classes,
                       {"train": s.train, "validation": s.validation, "test": s.test}, s.image_size, s.seed)
    index = report_mod.scan_data(spec)
    check_implies(index.classes, spec.data.implies)
    if spec.data.label_mode == "single":
        positive_class(index.classes, spec.report.positive)  # a ValueError naming the classes: exit 2
    if spec.data.labels is not None:  # the split this run used, so it can be repeated or reused
        from covid_tune.data.table import write_splits
        from covid_tune.engine.files import SPLITS_CSV

        log.info(f"splits of {spec.data.labels} -> {write_splits(index, spec.output_dir / SPLITS_CSV)}")
    pretrained = load_all(spec.grid.backbone, spec.trainer.weights, spec.trainer.weights_download)
    with _removed_on_error(spec.output_dir / "cache"):  # a refusal leaves no cache files of this run behind
        decoded = prepare_cache(spec, index)
        index, decoded = check_duplicates(spec, index, decoded)
        if spec.data.folds:
            from covid_tune.data.folds import fold_table

            index = report_mod.add_folds(spec, index)  # FoldError (a ValueError): exit 2
            log.info(f"{spec.data.folds} folds of train + validation by {spec.data.group_by}:\n"
                     + "\n".join(fold_table(index, spec.data.group_by)))
    return index, decoded, pretrained


def check_duplicates(spec: Spec, index: DatasetIndex, decoded: DecodedSplits | None
                     ) -> tuple[DatasetIndex, DecodedSplits | None]:
    """Compare the decoded pixels of validation and test with the earlier splits and apply
    ``data.on_duplicate``: warn (kept), error (DatasetError listing them), drop (removed from the later
    split). The finding is ``index.duplicates`` of the index returned."""
    from covid_tune.data.cache import find_duplicates, keep_rows
    from covid_tune.data.dataset import DatasetError, drop_duplicates

    dups = find_duplicates(index, spec.data.image_size, spec.data.grayscale, decoded,
                           spec.output_dir / "cache" if spec.data.cache else None, store=True)
    dups.action = spec.data.on_duplicate
    if dups.total and dups.action == "error":
        raise DatasetError(index.root, [f"{a} = {b} ({later} image also in {earlier})"
                                        for (later, earlier), found in dups.pairs.items() for a, b in found]
                           + [f"(data.on_duplicate: error; {dups.summary()}; warn keeps them, drop removes them "
                              "from the later split)"])
    if dups.total and dups.action == "drop":
        kept = drop_duplicates(index, dups)
        return kept, keep_rows(decoded, index, kept) if decoded is not None else None
    index.duplicates = dups
    return index, decoded


@contextlib.contextmanager
def _removed_on_error(folder: Path):
    """On an exception, remove the files (and the folders) created under ``folder`` and its missing parents
    since entering: what this run wrote there before a refusal."""
    top = folder
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    before = set(folder.rglob("*")) if folder.exists() else set()
    existed = top.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        elif folder.exists():
            for path in sorted(set(folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def prepare_cache(spec: Spec, index: DatasetIndex) -> DecodedSplits | None:
    """The sweep's decoded cache (built or read back from ``OUTPUT/cache``), or None with ``data.cache: false``.

    Call in the driver before trials start; pass the result to the trainable (``tune.with_parameters``).
    Trials only train and validate, so only ``train`` and ``validation`` are decoded.
    """
    from covid_tune.data.cache import build_decoded_cache

    if not spec.data.cache:
        return None
    return build_decoded_cache(index, spec.data.image_size, spec.data.grayscale, spec.output_dir / "cache",
                               splits=("train", "validation"))


def _new_console(spec: Spec, n_trials: int):
    from covid_tune.cli.console import SweepConsole

    sched = spec.scheduler
    return SweepConsole(total=n_trials, max_epochs=spec.trainer.epochs, metric=sched.metric, mode=sched.mode,
                        rungs=spec.asha_rung_epochs()[0], asha=sched.asha)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM to the driver: which one came first (the exit code, 128 + its number).

    While Tune's loop runs (``in_tune``, set by ``tuning.run_sweep``) the first one ends it as Tune
    ends it on Ctrl-C: Tune saves its state (for --resume), stops the trials and returns, and the run
    ends as interrupted. Otherwise, or at a second signal, KeyboardInterrupt unwinds the run through its
    ``finally`` blocks (Ray shut down). Tune's own SIGINT handler is switched off so that this one
    always sees the signal; Tune's loop is ended through its SIGUSR1 handler, the same function.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_tune = False
        self._saved: dict[int, object] = {}
        self._env: str | None = None

    @property
    def exit_code(self) -> int | None:
        return 128 + self.signum if self.signum else None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        """Handle SIGINT and SIGTERM here; call again after ``ray.init``, whose core worker installs
        its own SIGTERM handler (it aborts the driver)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only (a caller's own thread keeps its handling)
        if not self._saved:
            self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handle)
            self._saved.setdefault(sig, previous)

    def uninstall(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        tune_stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if first and self.in_tune and callable(tune_stop):
            tune_stop(signum, frame)
            return
        raise KeyboardInterrupt


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``covid-tune run``: the sweep, from spec to report; returns the exit code (see ``--help``).
    ``started``: the command's start (``time.perf_counter()``), the zero of the run's wall clock."""
    started = time.perf_counter() if started is None else started
    stop = StopSignals()
    stop.install()
    try:
        with contextlib.ExitStack() as cleanup:  # the output folder's lock, released however the run ends
            return _main(argv, stop, cleanup, started)
    except KeyboardInterrupt:
        if stop.signum is None:
            stop.signum = signal.SIGINT
        log.error(f"interrupted by {stop.name}; --resume finishes the sweep where Tune's state allows")
        return stop.exit_code
    finally:
        stop.uninstall()


def _main(argv: list[str] | None, stop: StopSignals, cleanup: contextlib.ExitStack, started: float) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    if not args.verbose:
        quiet_ray_environment()
    from covid_tune.spec.load import SpecError, load_spec  # after --help: these import torch

    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else []) \
        + ([f"ray.address={args.address}"] if args.address else [])
    try:
        spec = load_spec(args.spec, overrides)
    except SpecError as exc:
        log.error("%s", exc)
        return 2
    tracker_environment(spec, quiet=not args.verbose)
    from covid_tune.cli.console import resources_text, scheduler_text, summary_lines
    from covid_tune.cli.output_dir import (
        OutputLock,
        check_output,
        clear_for_overwrite,
        experiment_exists,
        record_experiment,
    )
    from covid_tune.data.dataset import DatasetError
    from covid_tune.models.registry import WeightsUnavailable
    from covid_tune.report import build as report_mod
    from covid_tune.spec import plan as plan_mod

    plan = plan_mod.expand(spec)
    if args.dry_run:
        from covid_tune.cli.preflight import preflight

        return preflight(spec, plan, resume=args.resume, overwrite=args.overwrite,
                         exists=experiment_exists(spec))

    out = spec.output_dir
    # nothing is written before these pass: the folder itself, this machine's resources, the cluster's
    # address and the free disk space
    problems = before_writing(spec, plan)
    if problems:
        for p in problems:
            log.error("%s", p)
        return 2
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        from covid_tune.sweep import cluster

        try:  # a cluster's nodes size their own object stores: join it before writing anything
            cluster.connect(spec.ray.address, quiet=not args.verbose)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            log.error(f"cannot join the Ray cluster at {spec.ray.address or os.environ.get('RAY_ADDRESS')}: {exc}")
            return 2
    lock = cleanup.enter_context(OutputLock(out))
    problem = lock.acquire()  # one sweep per output folder, from here to the end of the run
    if problem:
        log.error("%s", problem)
        return 2
    try:
        problem = check_output(spec, plan, resume=args.resume, overwrite=args.overwrite)
    except OSError as exc:  # a storage URI that cannot be reached (credentials, network, ...)
        problem = f"cannot check ray.storage_path {spec.storage_root}: {exc}"
    if problem:
        log.error("%s", problem)
        return 2
    phases: dict[str, float] = {"startup": time.perf_counter() - started}  # imports, spec, output checks
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock
        clock = now

    try:
        index, decoded, pretrained = prepare(spec)
    except (DatasetError, WeightsUnavailable, ValueError) as exc:
        log.error("%s%s", exc, " (--overwrite deleted nothing)" if args.overwrite else "")
        return 2
    if args.overwrite:
        clear_for_overwrite(spec)  # the data and weights passed: now the old sweep may go
    lap("cache")  # data checked (generated if synthetic), weights resolved, decoded cache built or read back
    dups = index.duplicates
    log.info(f"{len(plan)} trial(s) on {sum(len(v) for v in index.splits.values())} images "
         f"({', '.join(index.classes)}); output: {out}"
         + (f"; duplicates: {dups.summary()} ({_duplicate_action(dups.action)})" if dups and dups.total else ""))
    if not args.resume:
        record_experiment(spec)  # Tune creates the experiment next: --overwrite may delete it later
    report_mod.save_spec(out, spec)
    report_mod.save_data_checks(out, dups)
    if not args.resume:
        from covid_tune.sweep import resume_guard

        resume_guard.record_data(spec, report_mod.dataset_root(spec))  # a --resume must find the same data

    from covid_tune.results import collect as results_mod
    from covid_tune.sweep import cluster, evaluation, tuning  # Ray is imported only when a sweep really runs

    start = time.time()
    console = _new_console(spec, len(plan))
    evaluations = None
    try:
        try:
            # one copy per node of the decoded images (trials and test evaluation) and of the weights (the
            # trials', also resumed ones', only source)
            shared, weights = cluster.start_shared(spec, decoded, pretrained, quiet=not args.verbose)
            stop.install()  # Ray's core worker took SIGTERM over
            sched = spec.scheduler
            console.header(spec.name, out,
                           resources_text(spec.resources.cpus, spec.resources.gpu, cluster.cluster_resources(),
                                          len(plan), spec.ray.max_concurrent),
                           scheduler_text(sched.asha, sched.metric, sched.mode, console.rungs, spec.trainer.epochs))
            evaluations = tuning.start_evaluations(spec, plan, index, shared, weights)
            lap("ray_start")
            trials = tuning.run_sweep(spec, plan, index, shared, resume=args.resume, console=console,
                                      ray_output=args.verbose > 0, pretrained=weights, evaluations=evaluations,
                                      stop=stop)
            lap("trials")
        except (FileNotFoundError, ValueError) as exc:
            console.close()
            log.error("%s", exc)
            return 2
        console.close()
        if stop.signum:
            log.error("%s", interrupted_text(stop.name, trials, args.spec))
            return stop.exit_code
        log.info(f"trials finished in {phases['trials']:.0f} s; evaluating best checkpoints")
        if evaluations is not None:
            evaluations.wait()  # what the trials' last minutes left to do
            evaluator = evaluations.evaluator
        else:
            def evaluator(dirs, idx):
                return evaluation.evaluate_remote(results_mod.evaluator_for(spec.report.model_dump()), dirs, idx,
                                              spec.resources.cpus, spec.resources.gpu, decoded=shared,
                                              ship=cluster.models_travel(spec))
        lap("evaluation")

        def timed_evaluator(dirs, idx):
            lap("report")
            try:
                return evaluator(dirs, idx)
            finally:
                lap("evaluation")

        path = report_mod.build(out, spec, evaluator=timed_evaluator, index=index)
        lap("report")
    finally:
        if evaluations is not None:
            evaluations.close()
        tuning.disconnect()  # also on SIGINT/SIGTERM: a Ray this driver started leaves no process behind
    early = evaluations.early if evaluations is not None else 0
    timing = record_phases(path.parent / "results.json", phases, early, started)
    rows = report_mod.load_rows(out)
    for line in summary_lines(rows, spec.scheduler.metric, spec.scheduler.mode, path, out, time.time() - start):
        console.line(line)
    if dups and dups.total:
        console.line(f"data: {dups.summary()} ({_duplicate_action(dups.action)})")
    for line in log_to_trackers(spec, plan, path.parent):
        console.line(line)
    console.line("phases: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items())
                 + f"; {timing['outside_trials']:.0%} of {timing['wall_s']:.0f} s outside the trials"
                 + (f"; {early} test evaluation(s) started as their trial ended" if early else ""))
    return 1 if any(t["status"] == "error" for t in trials.values()) else 0


def tracker_environment(spec: Spec, quiet: bool) -> None:
    """The trackers' switches for this process and the Ray it starts (a user's own settings win): MLflow 3
    refuses a folder store (``file:``) unless MLFLOW_ALLOW_FILE_STORE is set, and a spec that names one
    (or no uri: OUTPUT/mlruns) asks for it; W&B's banners and run summaries (one per trial) are left out
    of the compact console."""
    if spec.tracking.mlflow is not None and spec.tracking.mlflow.resolved_uri(spec.output_dir).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if spec.tracking.wandb is not None and quiet:
        os.environ.setdefault("WANDB_SILENT", "true")


def log_to_trackers(spec: Spec, plan: dict, report_dir: Path) -> list[str]:
    """After the report: REPORT.md's folder and the chosen model (predict's choice) to each tracker of the
    spec; the console lines saying where. Nothing without ``tracking``."""
    if spec.tracking.mlflow is None and spec.tracking.wandb is None:
        return []
    from covid_tune.cli.predict import TargetError, best_model_dir
    from covid_tune.sweep import tracking

    try:
        chosen = best_model_dir(spec.output_dir)
    except TargetError as exc:
        log.warning(f"tracking: no chosen model to log ({exc})")
        chosen = None
    return tracking.log_outcome(spec, plan, report_dir, chosen)


def before_writing(spec: Spec, plan: dict) -> list[str]:
    """Why the sweep cannot start, found before anything is written: an output folder that is no folder
    of its own (or a file, or not writable), trials larger than this machine, a cluster address nothing
    answers at, less free disk space than the pre-flight estimate. Empty: go on."""
    from covid_tune.cli.preflight import data_size, resource_problems, start_problems

    num_classes, n_images = data_size(spec) or (2, 0)
    return resource_problems(spec) + start_problems(spec, plan, max(num_classes, 2), n_images)


def _duplicate_action(action: str) -> str:
    return {"warn": "kept, data.on_duplicate: warn", "drop": "removed from the later split, data.on_duplicate: drop"
            }.get(action, f"data.on_duplicate: {action}")


def interrupted_text(signame: str, trials: dict[str, dict], spec_path: Path) -> str:
    """The message of a sweep a signal cut: which trials are unfinished, how far they got, what next."""
    cut = [f"{cid} (epoch {t.get('epochs', 0)}/{t.get('epochs_max', '?')})" for cid, t in trials.items()
           if t["status"] == "interrupted"]
    return (f"interrupted by {signame}: {len(cut)} of {len(trials)} trial(s) unfinished"
            + (f": {', '.join(cut)}" if cut else "") + "; trials.json marks them, no report was written. "
            f"`covid-tune run {spec_path} --resume` finishes them")


def record_phases(results_json: Path, phases: dict[str, float], early: int, started: float) -> dict:
    """Add the run's phase times to results.json (``timing``): seconds per phase, the wall clock,
    the fraction of it spent outside the trials, and how many evaluations were done while trials ran."""
    wall = time.perf_counter() - started
    summary = {"phases_s": {k: round(phases.get(k, 0.0), 3) for k in PHASES}, "wall_s": round(wall, 3),
               "outside_trials": round(1 - phases.get("trials", 0.0) / wall, 4) if wall > 0 else 0.0,
               "evaluated_during_trials": early}
    data = json.loads(results_json.read_text())
    data["timing"] = summary
    results_json.write_text(json.dumps(data, indent=1))
    return summary
