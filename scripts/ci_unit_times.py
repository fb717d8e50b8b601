"""Seconds of test time per work unit (tests/conftest.py), from a pytest log: what
``COST`` in tests/conftest.py is refreshed from.

    python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=0 > suite.log
    python scripts/ci_unit_times.py suite.log

Prints each unit's summed setup, call and teardown time, longest first, the total, and the
wall time pytest reported; with two workers, total / 2 close to the wall time means the
units were well balanced.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import work_unit

DURATION = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)")
WALL = re.compile(r" in ([\d.]+)s")


def unit_times(lines):
    """{unit: seconds} from pytest's ``--durations`` lines, and the run's wall time."""
    totals, wall = {}, None
    for line in lines:
        m = DURATION.match(line)
        if m:
            unit = work_unit(m.group(2))
            totals[unit] = totals.get(unit, 0.0) + float(m.group(1))
        elif ("passed" in line or "failed" in line) and WALL.search(line):
            wall = float(WALL.search(line).group(1))
    return totals, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log", type=Path, help="pytest output run with --durations=0")
    a = p.parse_args(argv)
    totals, wall = unit_times(a.log.read_text().splitlines())
    if not totals:
        sys.exit(f"{a.log}: no '--durations' lines (run pytest with --durations=0)")
    for unit, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{sec:8.0f}  {unit}")
    total = sum(totals.values())
    print(f"{total:8.0f}  total test time" + (f"; wall {wall:.0f} s" if wall else ""))


if __name__ == "__main__":
    main()
