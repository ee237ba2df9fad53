"""``covid-tune report OUTPUT``: rebuild a sweep's REPORT.md, results.csv/json and figures without training."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from covid_tune.cli.main import setup_logging, verbosity_options

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the report written, 2 where OUTPUT is no sweep folder or its data is gone."""
    parser = argparse.ArgumentParser(prog="covid-tune report",
                                     description="Rebuild REPORT.md, results.csv/json and figures of a sweep's "
                                                 "output folder without training.")
    parser.add_argument("output", type=Path, help="the sweep's output folder (holds spec.json)")
    verbosity_options(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    from covid_tune.data.dataset import DatasetError  # after --help: these import torch
    from covid_tune.report.build import build, load_saved_spec
    from covid_tune.spec.load import SpecError

    try:
        spec = load_saved_spec(args.output.resolve())
        path = build(args.output.resolve(), spec)
    except (SpecError, DatasetError) as exc:
        log.error("%s", exc)
        return 2
    print(f"report written: {path}")
    return 0
