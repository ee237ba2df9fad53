"""What a user sees: the compact console (lines parsed back), Tune's param_space, the pre-flight,
spec errors reported all at once, a --help that needs neither torch nor Ray."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_image

from covid_tune.cli.console import SweepConsole, best_row, disk_usage, last_line, summary_lines
from covid_tune.engine import schedule
from covid_tune.spec import plan as plan_mod
from covid_tune.spec.load import SpecError, validate

EVENT = re.compile(r"^\[\s*(\S+)\] (start|epoch|stop|done|FAIL|retry)\s+(\S+)(?:  (.*))?$")


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_tune", "run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def events(text: str) -> list[tuple[str, str, str]]:
    return [(m[2], m[3], m[4] or "") for m in map(EVENT.match, text.splitlines()) if m]


def test_console_lines_events_and_eta() -> None:
    clock, out = Clock(), io.StringIO()
    con = SweepConsole(total=3, max_epochs=4, metric="val_loss", mode="min", rungs=[1, 2, 4], stream=out,
                       live=False, epoch_every_s=30, clock=clock)
    con.started("a")
    con.started("b")
    clock.t = 10
    con.result("a", 1, 0.9)
    con.result("b", 1, 0.5)  # under 30 s since start: no epoch line
    clock.t = 40
    con.result("a", 2, 0.8)  # 40 s since its start line: an epoch line
    con.completed("a")  # after epoch 2 of 4: ASHA, rung 2
    con.result("b", 2, 0.4)
    con.result("b", 3, 0.45)
    con.result("b", 4, 0.41)
    con.completed("b")
    con.started("c")
    con.failed("c", "Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\n")
    got = events(out.getvalue())
    assert [(k, c) for k, c, _ in got] == [("start", "a"), ("start", "b"), ("epoch", "a"), ("stop", "a"),
                                           ("epoch", "b"), ("done", "b"), ("start", "c"), ("FAIL", "c")]
    detail = dict(((k, c), d) for k, c, d in got)
    assert detail[("epoch", "a")].startswith("epoch 2/4 val_loss 0.8;")
    assert "stopped by ASHA at rung 2 (epoch 2)" in detail[("stop", "a")]
    assert detail[("done", "b")].startswith("epoch 4/4 val_loss 0.41 (best 0.4 at epoch 2)")
    assert detail[("FAIL", "c")] == "after epoch 0: RuntimeError: out of memory"
    assert "\r" not in out.getvalue()  # piped: whole lines only
    # ETA after a's stop at 40 s: 2 + 2 epochs in 40 s (10 s an epoch), b at epoch 2 of an expected 2
    # (a's mean) and c not started: 2 epochs left -> 20 s
    clock.t = 0
    con2 = SweepConsole(total=3, max_epochs=4, metric="m", mode="min", stream=io.StringIO(), live=False, clock=clock)
    con2.started("a"), con2.started("b")
    con2.result("a", 2, 1.0), con2.result("b", 2, 1.0)
    clock.t = 40
    con2.completed("a")
    assert con2.eta_seconds() == pytest.approx(20.0)


def test_console_on_a_terminal_rewrites_one_status_line() -> None:
    out = io.StringIO()
    con = SweepConsole(total=2, max_epochs=3, metric="val_acc", mode="max", stream=out, live=True, clock=Clock())
    con.started("a")
    con.result("a", 1, 0.75)
    con.completed("a")
    text = out.getvalue()
    assert "\r\x1b[K" in text and "running: a ep 1/3 0.75" in text
    # what stays on screen once each status line is erased: the event lines only
    shown = re.sub(r"\r\x1b\[K", "\n", text)
    finals = [ln for ln in shown.splitlines() if EVENT.match(ln)]
    assert [EVENT.match(ln)[2] for ln in finals] == ["start", "stop"]


def test_asha_rungs_are_rays() -> None:
    from ray.tune.schedulers import ASHAScheduler

    for max_t, grace, rf in ((6, 2, 2), (24, 4, 2), (4, 1, 2), (10, 1, 3), (9, 2, 1.5), (3, 3, 2)):
        sched = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace, reduction_factor=rf)
        ray_rungs = sorted(-(-m // 1) for m, _ in sched._brackets[0]._rungs)
        assert schedule.rungs_by_level(grace, rf, max_t, max_t, ["x"])["x"] == ray_rungs, (max_t, grace, rf)


def test_param_space_resolves_to_the_plan(tiny_raw) -> None:
    from ray.tune.search.variant_generator import generate_variants

    from covid_tune.sweep import tuning

    tiny_raw["grid"]["lr"] = [0.01, 0.001]
    spec = validate(tiny_raw)
    plan = plan_mod.expand(spec)
    configs = [cfg for _, cfg in generate_variants(tuning.param_space(spec, plan))]
    assert [c["config_id"] for c in configs] == list(plan)
    for c in configs:
        hp = plan[c["config_id"]]
        assert c == {"config_id": c["config_id"], "backbone": hp.backbone, "freeze": hp.freeze, "loss": hp.loss,
                     "seed": hp.seed, "lr": hp.lr}
    assert len({(c["freeze"], c["lr"]) for c in configs}) == 4


def test_summary_names_best_configuration_report_and_disk(tmp_path: Path) -> None:
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "big.bin").write_bytes(b"x" * 5000)
    (tmp_path / "spec.json").write_text("{}")
    rows = [{"config_id": "a", "status": "ok", "stopped_early": True, "best_epoch": 1,
             "history": [{"epoch": 1, "val_loss": 0.5}], "eval": {"test": {"acc": 0.8}}},
            {"config_id": "b", "status": "ok", "stopped_early": False, "best_epoch": 2,
             "history": [{"epoch": 1, "val_loss": 0.6}, {"epoch": 2, "val_loss": 0.3}], "eval": {"test": {"acc": 0.9}}},
            {"config_id": "c", "status": "error", "best_epoch": None, "history": []}]
    assert best_row(rows, "val_loss", "min")[0]["config_id"] == "b"
    assert best_row(rows, "val_loss", "max")[0]["config_id"] == "a"
    total, parts = disk_usage(tmp_path)
    assert total == 5002 and list(parts) == ["ray", "spec.json"]
    lines = summary_lines(rows, "val_loss", "min", tmp_path / "report" / "REPORT.md", tmp_path, 75)
    assert lines[0] == "finished in 1m15s: 3 configuration(s), 1 ran every epoch, 1 stopped by ASHA, 1 failed"
    assert lines[1] == "best: b (val_loss 0.3 at epoch 2; test accuracy 90.00%)"
    assert lines[2].startswith("report: ") and lines[3] == f"disk: {tmp_path} holds 5 KB (ray 5 KB)"
    assert last_line("a\n\nValueError: x\n  ") == "ValueError: x"


def test_report_headings_and_rows_tell_configurations_apart() -> None:
    from covid_tune.report.figures import markdown
    from covid_tune.report.sections import metric_table

    base = {"group": None, "backbone": "tiny_cnn", "layers": "Only FC", "loss": "ce", "seed": 0, "optimizer": "sgd",
            "lr_schedule": "constant", "momentum": 0.9, "weight_decay": 0.0, "batch_size": 16, "head_hidden": 16,
            "dropout": 0.2, "epochs_trained": 2, "stopped_early": False, "sr": 1}
    rows = [{**base, "config_id": f"x-lr{lr:g}", "group": f"x-lr{lr:g}", "lr": lr, "sr": i}
            for i, lr in enumerate((0.01, 0.001), 1)]
    for r in rows:
        r.update({f"{p}_acc": 0.5 for p in ("train", "val", "test")})
    headings = [ln for ln in markdown({r["config_id"]: {"loss": "l.png"} for r in rows}, rows, ("lr",))
                if ln.startswith("###")]
    assert headings == ["### 1. tiny_cnn, Only FC, ce, lr 0.01, seed 0",
                        "### 2. tiny_cnn, Only FC, ce, lr 0.001, seed 0"]
    table = [ln for ln in metric_table(rows, "acc").splitlines()[2:]]
    assert len(table) == 2 and len(set(ln.split("|", 2)[2] for ln in table)) == 2  # differ past the Sr # column


def test_two_bad_keys_and_a_bad_combination_in_one_message(tiny_raw) -> None:
    tiny_raw["trainer"]["optimizer"] = "rmsprop"
    tiny_raw["trainer"]["colour"] = "red"
    tiny_raw["grid"]["freeze"] = {"tiny_cnn": ["conv9"]}
    with pytest.raises(SpecError) as err:
        validate(tiny_raw)
    msg = str(err.value)
    assert "trainer.optimizer: Input should be 'sgd' or 'adam'" in msg
    assert "trainer.colour: unknown key" in msg
    assert "grid.freeze: backbone 'tiny_cnn' has no freeze level 'conv9'" in msg


def test_dry_run_lists_three_planted_problems_at_once(tmp_path: Path, image_folder) -> None:
    root = image_folder(classes=("infected", "normal"), n=2)
    (root / "test" / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    spec = {"name": "pre", "output": str(tmp_path / "out"),
            "data": {"root": str(root), "image_size": 32, "on_bad_file": "error"},
            "grid": {"backbone": ["tiny_cnn"]},
            "trainer": {"epochs": 2, "weights": str(tmp_path / "no-such-weights.pt")},
            "resources": {"cpus": 512}}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli(str(path), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pre-flight found 3 problem(s)" in proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("  - ")]
    assert len(problems) == 3
    assert "broken.png: unreadable image" in problems[0]
    assert "no-such-weights.pt does not exist" in problems[1]
    assert "resources.cpus=512" in problems[2]
    # and what was checked is listed: the grid, the splits with their counts, the rungs, the disk
    assert "tiny_cnn-none-ce-s0" in proc.stdout and "scheduler: ASHA" in proc.stdout and "disk: about" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_good_tree_counts_files(tmp_path: Path, image_folder) -> None:
    root = image_folder(classes=("infected", "normal"), n=2)
    write_image(root / "train" / "normal" / "extra.png")
    spec = {"name": "ok", "output": str(tmp_path / "out"), "data": {"root": str(root), "image_size": 32},
            "grid": {"backbone": ["tiny_cnn"], "freeze": ["fc_only", "none"]}, "trainer": {"epochs": 2},
            "resources": {"cpus": 1}}
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli(str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "  train: 5 images (infected 2, normal 3)" in proc.stdout
    assert "  test: 4 images (infected 2, normal 2)" in proc.stdout
    assert "pre-flight: no problem found; 2 trial(s) ready" in proc.stdout


def test_help_and_version_load_neither_torch_nor_ray() -> None:
    # `covid-tune run --help` and `covid-tune --version`, in one process
    code = ("import sys, contextlib, io\nfrom covid_tune.cli import main, run\n"
            "for call in (lambda: run.parse_args(['--help']), lambda: main.main(['--version'])):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as f:\n"
            "        try: call()\n"
            "        except SystemExit: pass\n"
            "    print(repr(f.getvalue()))\n"
            "print(sorted(m for m in ('torch', 'ray', 'pandas', 'pydantic') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    help_text, version, loaded = proc.stdout.strip().splitlines()
    assert loaded == "[]", loaded
    assert "exit codes:" in help_text and "examples:" in help_text and "--verbose" in help_text
    from covid_tune import __version__

    assert version == repr(f"covid_tune {__version__}\n")
    proc = subprocess.run([sys.executable, "-m", "covid_tune", "--version"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"covid_tune {__version__}"


@pytest.mark.slow
def test_compact_console_of_a_small_sweep(tmp_path: Path) -> None:
    """A demo-like sweep through the CLI, piped: header, one start and one end line per trial, a
    summary; nothing of Ray's own output; params.json holds the real hyperparameters. Its image folder
    shares two images across splits (test_faults_inputs' issue 27 case 12, merged here to save a sweep):
    the console, REPORT.md and data-checks.json name them."""
    from test_faults_inputs import add_duplicates, make_tree

    root = make_tree(tmp_path / "data", n=6)
    add_duplicates(root)
    spec = {"name": "live", "output": str(tmp_path / "out"),
            "data": {"root": str(root), "image_size": 32, "augment": False},
            "grid": {"backbone": ["tiny_cnn"], "freeze": ["fc_only", "none"], "loss": "ce", "lr": [0.01, 0.001]},
            "trainer": {"epochs": 2, "batch_size": 16, "head_hidden": 16},
            "scheduler": {"metric": "val_loss", "grace_period": 1}, "resources": {"cpus": 1}}
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli(str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    assert proc.stdout == ""  # the console is on stderr; no Tune table, box or folder hint on stdout
    err = proc.stderr.splitlines()
    head = next(i for i, ln in enumerate(err) if ln.startswith("covid_tune live: 4 trial(s), up to 2 epoch(s)"))
    assert err[head].endswith(f"-> {tmp_path / 'out'}")
    assert err[head + 1].startswith("  resources: 1 CPU, 0 GPU per trial; up to ")
    assert err[head + 2] == "  scheduler: ASHA on val_loss (min): rungs at epoch(s) 1 (of 2)"
    got = events(proc.stderr)
    plan_ids = {f"tiny_cnn-{f}-ce-lr{lr}-s0" for f in ("fc_only", "none") for lr in ("0.01", "0.001")}
    assert {c for k, c, _ in got if k == "start"} == plan_ids
    ends = {c: (k, d) for k, c, d in got if k in ("stop", "done", "FAIL")}
    assert set(ends) == plan_ids
    for cid, (kind, detail) in ends.items():
        m = re.match(r"epoch (\d)/2 val_loss [\d.]+", detail)
        assert m and (kind == "done") == (m[1] == "2"), (cid, kind, detail)
        assert kind == "done" or "stopped by ASHA at rung 1 (epoch 1)" in detail
    assert "4/4 done" in got[-1][2]
    summary = err[next(i for i, ln in enumerate(err) if ln.startswith("finished in ")):]
    assert re.match(r"finished in \S+: 4 configuration\(s\), \d ran every epoch, \d stopped by ASHA, 0 failed",
                    summary[0])
    assert summary[1].startswith("best: tiny_cnn-") and summary[2] == f"report: {tmp_path / 'out/report/REPORT.md'}"
    assert summary[3].startswith(f"disk: {tmp_path / 'out'} holds ")
    assert not any("Checkpoint successfully created" in ln or "snapshotting" in ln for ln in lines)
    # the images shared across splits: one console line, REPORT.md, data-checks.json
    assert "duplicates: 1 validation image also in train, 1 test image also in train" in proc.stderr
    report = (tmp_path / "out" / "report" / "REPORT.md").read_text()
    assert "**Duplicates across splits** (identical decoded pixels): 1 validation image also in train" in report
    checks = json.loads((tmp_path / "out" / "data-checks.json").read_text())
    assert checks["duplicates"]["action"] == "warn" and len(checks["duplicates"]["pairs"]) == 2

    experiment = tmp_path / "out" / "ray" / "live"
    params = [json.loads(p.read_text()) for p in experiment.glob("*/params.json")]
    assert {p["config_id"] for p in params} == plan_ids
    for p in params:
        assert set(p) == {"config_id", "backbone", "freeze", "loss", "seed", "lr"}
        assert p["config_id"] == f"tiny_cnn-{p['freeze']}-ce-lr{p['lr']:g}-s{p['seed']}"
    header = next(experiment.glob("*/progress.csv")).read_text().splitlines()[0].split(",")
    assert {"hp/config_id", "hp/backbone", "hp/freeze", "hp/loss", "hp/seed", "hp/lr"} <= set(header)
    assert list(experiment.glob("*/events.out.tfevents.*"))  # TensorBoard (HParams) next to them


SIGTERM_NOISE = [  # a trial actor's stderr as CI forwarded it once, stopped by Tune at the end of a sweep
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f3b6db1a520>",
    "Traceback (most recent call last):",
    '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
    "    def _remove(item, selfref=ref(self)):",
    "",
    '  File ".../site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
    "    raise_sys_exit_with_custom_error_message(",
    '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
    "SystemExit: 1"]


def test_a_stopping_workers_sigterm_traceback_stays_off_the_console() -> None:
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from covid_tune.sweep.cluster import filter_worker_logs, without_sigterm_tracebacks

    other = ["Exception ignored in: <function f>", "Traceback (most recent call last):", "ValueError: x",
             "SystemExit: 2"]  # not Ray's handler: a traceback of ours or the user's, kept
    assert without_sigterm_tracebacks(["before", *SIGTERM_NOISE, "after"]) == ["before", "after"]
    assert without_sigterm_tracebacks(other) == other
    assert without_sigterm_tracebacks(SIGTERM_NOISE[:3]) == SIGTERM_NOISE[:3]  # unfinished block: kept

    printed: list[dict] = []
    dispatcher = WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", printed.append)
    assert filter_worker_logs(dispatcher) and not filter_worker_logs(dispatcher)  # wrapped once
    dispatcher.emit({"lines": SIGTERM_NOISE, "pid": 1, "is_err": True})
    dispatcher.emit({"lines": ["a trial's own error", *SIGTERM_NOISE], "pid": 2, "is_err": True})
    assert printed == [{"lines": ["a trial's own error"], "pid": 2, "is_err": True}]
    dispatcher.remove_handler("ray_print_logs")  # as ray.shutdown does
    assert dispatcher.handlers == []
    assert not filter_worker_logs(WorkerStandardStreamDispatcher())  # log_to_driver off: nothing to wrap


def test_summary_best_is_the_reports_best_configuration_over_seeds() -> None:
    from covid_tune.cli.console import best_line
    from covid_tune.results.stats import best_group

    def row(cid: str, group: str, score: float, test: float) -> dict:
        return {"config_id": cid, "group": group, "status": "ok", "best_epoch": 3, "select_score": score,
                "history": [{"epoch": 3, "val_acc": score}],
                "eval": {"test": {"acc": test, "correct": [1, 0]}}}

    # b's single best trial (0.90) beats every a trial, but a is better on average over its seeds
    rows = [row("a-s0", "a", 0.85, 0.80), row("a-s1", "a", 0.84, 0.82),
            row("b-s0", "b", 0.90, 0.86), row("b-s1", "b", 0.70, 0.70)]
    assert best_group(rows, "val_acc", "max") == "a"
    assert best_line(rows, "val_acc", "max") == ("best: a (mean selection score on val_acc 0.845 over 2 seeds; "
                                                 "test accuracy 81.00 ± 1.41%)")
    for fold, r in enumerate(rows):
        r["fold"] = fold % 2  # fold trials of one configuration are not seeds
    assert "over 2 trials (folds x seeds);" in best_line(rows, "val_acc", "max")
    failed = {"config_id": "a-s2", "group": "a", "status": "error", "best_epoch": None, "history": [], "eval": {}}
    assert "over 2 trials" in best_line(rows + [failed], "val_acc", "max")  # a trial with no score is left out
    one = [row("a-s0", "a", 0.85, 0.80), row("b-s0", "b", 0.90, 0.86)]
    one[1]["history"][0]["val_acc"] = 0.88  # the raw value at the chosen epoch, beside an EMA score of 0.90
    assert best_line(one, "val_acc", "max") == "best: b-s0 (val_acc 0.88 at epoch 3; test accuracy 86.00%)"
    assert best_line([], "val_acc", "max") == ""
