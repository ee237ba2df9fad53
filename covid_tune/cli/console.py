"""What a sweep prints: a header, one line per trial event, a live status line, a final summary.

Knows nothing of Ray: ``tuning.LiveView`` (a Tune callback) feeds it trial events. On a terminal
a status line (running trials, epochs, ETA) is rewritten in place under the event lines; piped
(CI logs, files) only whole lines are written. Every event line reads
``[elapsed] EVENT config_id  detail``, EVENT one of start, epoch, stop, done, FAIL, retry.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import TextIO

from covid_tune.engine.files import file_bytes_once


def fmt_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_bytes(n: float) -> str:
    """``12 KB``, ``516 MB``, ``1.2 GB`` (powers of 1000, as ``du --si``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit in ("B", "KB", "MB") or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_usage(folder: Path) -> tuple[int, dict[str, int]]:
    """Bytes under ``folder`` in all and per top-level entry (links not followed, a hard-linked file
    counted once: the first entry that holds it), largest first."""
    parts: dict[str, int] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return 0, parts
    seen: set[tuple[int, int]] = set()
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.is_symlink():
            files = (os.path.join(root, f) for root, _, names in os.walk(child) for f in names)
        else:
            files = [child]
        parts[child.name] = file_bytes_once(files, seen)
    return sum(parts.values()), dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def disk_line(folder: Path) -> str:
    """``disk: OUTPUT 688 MB (ray 516 MB, best 172 MB, ...)``."""
    total, parts = disk_usage(folder)
    shown = [f"{name} {fmt_bytes(size)}" for name, size in parts.items() if size >= 1000][:5]
    return f"disk: {folder} holds {fmt_bytes(total)}" + (f" ({', '.join(shown)})" if shown else "")


@dataclass
class _Trial:
    started: float
    epoch: int = 0
    value: float | None = None
    best: float | None = None
    best_epoch: int = 0
    printed: float = 0.0  # when this trial's last line was written


@dataclass
class SweepConsole:
    """The live view of one sweep. ``stream`` defaults to stderr; ``live`` (in-place status line)
    defaults to whether the stream is a terminal. Epoch lines of one trial come at most every
    ``epoch_every_s`` seconds (its end line always says its last epoch)."""

    total: int
    max_epochs: int
    metric: str
    mode: str
    rungs: list[int] = field(default_factory=list)
    asha: bool = True  # False: no trial is ever said to be stopped by ASHA
    stream: TextIO | None = None
    live: bool | None = None
    epoch_every_s: float = 30.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.stream = self.stream or sys.stderr
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self.clock()
        self.trials: dict[str, _Trial] = {}
        self.ended: dict[str, tuple[str, int]] = {}  # config id -> (stop | done | FAIL, epochs)
        self._status_shown = False

    # -- output --------------------------------------------------------------------------
    def line(self, text: str) -> None:
        """Write a whole line (above the status line on a terminal)."""
        self._clear_status()
        self.stream.write(text + "\n")
        self._draw_status()
        self.stream.flush()

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False

    def _draw_status(self) -> None:
        if not self.live or not self.trials:
            return
        running = [f"{cid} ep {t.epoch}/{self.max_epochs}" + (f" {self._num(t.value)}" if t.value is not None else "")
                   for cid, t in self.trials.items()]
        text = f"{len(self.ended)}/{self.total} done, {self.eta_text()} | running: " + "; ".join(running)
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write(text[:width])
        self._status_shown = True

    def close(self) -> None:
        """Remove the status line (before other output follows)."""
        self._clear_status()
        self.stream.flush()

    def _event(self, kind: str, cid: str, detail: str = "") -> None:
        self.line(f"[{fmt_duration(self.clock() - self.t0):>6}] {kind:<5} {cid}" + (f"  {detail}" if detail else ""))

    @staticmethod
    def _num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    # -- events ----------------------------------------------------------------------------
    def header(self, name: str, output: Path, resources: str, scheduler: str) -> None:
        """The run's first lines: where it writes, how many trials, resources, ASHA rungs."""
        self.line(f"covid_tune {name}: {self.total} trial(s), up to {self.max_epochs} epoch(s) each -> {output}")
        self.line(f"  resources: {resources}")
        self.line(f"  scheduler: {scheduler}")

    def started(self, cid: str) -> None:
        self.trials[cid] = _Trial(started=self.clock())
        self.trials[cid].printed = self.trials[cid].started
        self._event("start", cid)

    def result(self, cid: str, epoch: int, value: float | None) -> None:
        t = self.trials.setdefault(cid, _Trial(started=self.clock()))
        t.epoch, t.value = epoch, value
        better = value is not None and (t.best is None or (value < t.best if self.mode == "min" else value > t.best))
        if better:
            t.best, t.best_epoch = value, epoch
        now = self.clock()
        if now - t.printed >= self.epoch_every_s and epoch < self.max_epochs:
            t.printed = now
            self._event("epoch", cid, f"epoch {epoch}/{self.max_epochs} {self.metric} {self._num(value)}; "
                                      f"{len(self.ended)}/{self.total} done, {self.eta_text()}")
        elif self.live:
            self.line_refresh()

    def line_refresh(self) -> None:
        """Redraw the status line only."""
        self._clear_status()
        self._draw_status()
        self.stream.flush()

    def completed(self, cid: str, epoch: int | None = None) -> None:
        """A trial ended without error: stopped by ASHA before the last epoch, or done. ``epoch``: its
        last reported epoch as Tune has it (a restored trial may end with no new result seen here)."""
        t = self.trials.pop(cid, None) or _Trial(started=self.clock())
        if epoch is not None and int(epoch) > t.epoch:
            t.epoch = int(epoch)
        kind = "done" if t.epoch >= self.max_epochs else "stop"
        self.ended[cid] = (kind, t.epoch)
        detail = f"epoch {t.epoch}/{self.max_epochs} {self.metric} {self._num(t.value)}"
        if t.best_epoch and t.best_epoch != t.epoch:
            detail += f" (best {self._num(t.best)} at epoch {t.best_epoch})"
        if kind == "stop":
            rung = next((i for i, r in enumerate(self.rungs, 1) if r == t.epoch), None)
            if not self.asha:
                detail += "; ended before its last epoch"
            else:
                detail += f"; stopped by ASHA at rung {rung} (epoch {t.epoch})" if rung else "; stopped early"
        self._event(kind, cid, f"{detail}; {len(self.ended)}/{self.total} done, {self.eta_text()}")

    def failed(self, cid: str, error: str) -> None:
        t = self.trials.pop(cid, None) or _Trial(started=self.clock())
        self.ended[cid] = ("FAIL", t.epoch)
        self._event("FAIL", cid, f"after epoch {t.epoch}: {last_line(error)}")

    def retrying(self, cid: str, error: str) -> None:
        t = self.trials.get(cid)
        self._event("retry", cid, f"after epoch {t.epoch if t else 0}: {last_line(error)}")

    # -- ETA -------------------------------------------------------------------------------
    def eta_seconds(self) -> float | None:
        """Seconds left: epochs still expected (ended trials' mean under ASHA, else the maximum) at the
        pace seen so far. None before the first epoch."""
        done_epochs = sum(e for _, e in self.ended.values()) + sum(t.epoch for t in self.trials.values())
        if done_epochs == 0:
            return None
        ended = [e for k, e in self.ended.values() if k != "FAIL"]
        expected = sum(ended) / len(ended) if ended else self.max_epochs
        left = sum(max(0.0, expected - t.epoch) for t in self.trials.values())
        left += max(0, self.total - len(self.ended) - len(self.trials)) * expected
        return left * (self.clock() - self.t0) / done_epochs

    def eta_text(self) -> str:
        eta = self.eta_seconds()
        return "ETA -" if eta is None else f"ETA {fmt_duration(eta)}"


def last_line(text: str) -> str:
    """The last non-empty line of an error text (a traceback's exception line)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "unknown error"


def scheduler_text(asha: bool, metric: str, mode: str, rungs: list[int], max_epochs: int) -> str:
    """``ASHA on val_loss (min): rungs at epochs 2, 4 (of 6)``."""
    if not asha:
        return f"FIFO (no early stopping), best epoch by {metric} ({mode})"
    shown = [r for r in rungs if r < max_epochs]
    where = f"rungs at epoch(s) {', '.join(map(str, shown))}" if shown else "no rung before the last epoch"
    return f"ASHA on {metric} ({mode}): {where} (of {max_epochs})"


def resources_text(cpus: float, gpu: float, have: dict[str, float], total: int, max_concurrent: int | None) -> str:
    """``1 CPU, 0 GPU per trial; up to 2 at a time (Ray: 2 CPU, 0 GPU)``."""
    fits = [math.floor(have.get("CPU", 0) / cpus)] + ([math.floor(have.get("GPU", 0) / gpu)] if gpu > 0 else [])
    at_once = max(1, min(fits + [total] + ([max_concurrent] if max_concurrent else [])))
    return (f"{cpus:g} CPU, {gpu:g} GPU per trial; up to {at_once} at a time "
            f"(Ray: {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU)")


def best_row(rows: list[dict], metric: str, mode: str) -> tuple[dict, float] | None:
    """The configuration whose best epoch has the best ``metric`` (report rows), with that value."""
    from covid_tune.results.selection import best_of

    def value(r: dict) -> float | None:
        at = next((h for h in r.get("history") or [] if h.get("epoch") == r.get("best_epoch")), None)
        return None if at is None else at.get(metric)

    row = best_of(rows, value, mode)
    return None if row is None else (row, value(row))


def best_line(rows: list[dict], metric: str, mode: str) -> str:
    """``best: ...``: the configuration REPORT.md calls best (best mean selection score over its seeds), or,
    before the test evaluation, the trial whose best epoch has the best ``metric``; "" if none."""
    from covid_tune.results.stats import accuracy_on_test, best_group, selection_score

    group = best_group(rows, metric, mode)
    # members with a score: a trial that failed before its first epoch has none
    members = [r for r in rows if group is not None and r.get("group") == group
               and selection_score(r, metric) is not None]
    if len(members) > 1:
        scores = [selection_score(r, metric) for r in members]
        tests = [100 * t for t in map(accuracy_on_test, members) if t is not None]
        test = f"; test accuracy {mean(tests):.2f} ± {stdev(tests):.2f}%" if len(tests) > 1 else ""
        what = "trials (folds x seeds)" if any(r.get("fold") is not None for r in members) else "seeds"
        return f"best: {group} (mean selection score on {metric} {mean(scores):.4g} over {len(members)} {what}{test})"
    best = best_row(members or rows, metric, mode)
    if best is None:
        return ""
    row, value = best
    test = accuracy_on_test(row)
    return (f"best: {row['config_id']} ({metric} {value:.4g} at epoch {row['best_epoch']}"
            + (f"; test accuracy {100 * test:.2f}%" if test is not None else "") + ")")


def summary_lines(rows: list[dict], metric: str, mode: str, report: Path, output: Path, seconds: float) -> list[str]:
    """The sweep's last lines: outcome counts, the best configuration, the report, the disk footprint."""
    ok = [r for r in rows if r.get("status") == "ok"]
    stopped = sum(1 for r in ok if r.get("stopped_early"))
    failed = sum(1 for r in rows if r.get("status") == "error")
    other = len(rows) - len(ok) - failed
    lines = [f"finished in {fmt_duration(seconds)}: {len(rows)} configuration(s), {len(ok) - stopped} ran every "
             f"epoch, {stopped} stopped by ASHA, {failed} failed" + (f", {other} incomplete" if other else "")]
    best = best_line(rows, metric, mode)
    if best:
        lines.append(best)
    lines += [f"report: {report}", disk_line(output)]
    return lines
