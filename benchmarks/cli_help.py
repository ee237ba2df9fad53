"""How long ``covid-tune run --help`` takes, side by side with importing what a sweep needs.

    python benchmarks/cli_help.py [--repeat 5]

Prints the median wall time of each and their ratio (the goal: --help under ~1.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_s(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    help_s = median_s([sys.executable, "-m", "covid_tune", "run", "--help"], args.repeat)
    heavy_import = "import covid_tune.spec.load, covid_tune.spec.plan, covid_tune.report.build"
    heavy_s = median_s([sys.executable, "-c", heavy_import], args.repeat)
    print(f"--help: {help_s:.2f} s; importing spec/plan/report (torch, pandas): {heavy_s:.2f} s; "
          f"ratio {heavy_s / help_s:.1f}x (median of {args.repeat})")


if __name__ == "__main__":
    main()
