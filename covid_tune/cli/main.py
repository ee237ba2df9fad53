"""``covid-tune``: the one command (``python -m covid_tune`` is the same).

Only the standard library is imported here: ``--help`` and ``--version`` answer at once, and each
subcommand imports what it needs (torch, Ray) only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

# subcommand -> (module with main(argv), one line of help)
COMMANDS = {
    "run": ("covid_tune.cli.run", "run a sweep (or --dry-run its pre-flight) and write OUTPUT/report/REPORT.md"),
    "report": ("covid_tune.cli.report", "rebuild a sweep's REPORT.md, results.csv/json and figures without training"),
    "predict": ("covid_tune.cli.predict", "classify images with a sweep's chosen model or an exported model"),
    "export": ("covid_tune.cli.export", "export a sweep's chosen model or an exported model as ONNX or TorchScript"),
}

EPILOG = """\
exit codes (every subcommand):
  0  done
  1  done in part: a trial failed, or an image could not be read (named on stderr)
  2  bad input (spec, data, weights, resources, output folder, model folder): nothing was done
  130, 143  interrupted (Ctrl-C, SIGTERM): `covid-tune run SPEC --resume` finishes the sweep

`covid-tune COMMAND --help` for each command's options."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (so a redirected or captured
    stderr gets the messages)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it in __init__
        pass


class _Format(logging.Formatter):
    """Problems read ``covid_tune: ...`` (the Unix ``prog: message`` form that scripts and tests grep for);
    progress reads ``[covid_tune] ...``, so it never passes for one."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "covid_tune: " if record.levelno >= logging.WARNING else "[covid_tune] "
        return prefix + record.getMessage()


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """One handler on the ``covid_tune`` logger, set by the command line: INFO by default (progress),
    WARNING with ``-q``, DEBUG with ``-vv``; on stderr."""
    logger = logging.getLogger("covid_tune")
    for h in list(logger.handlers):
        if isinstance(h, _StderrHandler):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO)
    logger.propagate = False  # ray.init's logging config adds a root handler: each line would print twice


def verbosity_options(parser: argparse.ArgumentParser) -> None:
    """The -v/-q options every subcommand takes."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output (run: Ray's and Tune's own progress tables and logs; -vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def _version() -> str:
    from covid_tune import __version__

    return f"covid_tune {__version__}"


def main(argv: list[str] | None = None) -> int:
    """``covid-tune COMMAND ...``; returns the exit code."""
    started = time.perf_counter()  # a run's wall clock starts here, before any heavy import
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="covid-tune", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reproducible, distributed sweeps of chest X-ray classifiers on Ray Tune.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(_version())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        hint = f" (a spec? covid-tune run {command})" if command.endswith((".yaml", ".yml")) else ""
        print(f"covid_tune: unknown command {command!r}{hint}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest, started=started) if command == "run" else module.main(rest)


def cli() -> None:
    """The ``covid-tune`` console script."""
    sys.exit(main())
