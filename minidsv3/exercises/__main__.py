"""Command line for instructors.

    python -m minidsv3.exercises build            # solutions -> student notebooks
    python -m minidsv3.exercises build --check    # exit 1 if the student notebooks are stale
    python -m minidsv3.exercises grade PATH... [--csv FILE] [--timeout S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import build, grade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidsv3.exercises",
                                     description="Build and grade the classroom exercises.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_build = commands.add_parser("build", help="generate the student notebooks from the "
                                                "solution notebooks")
    p_build.add_argument("--check", action="store_true",
                         help="only compare; exit 1 if any student notebook is out of sync")
    p_build.add_argument("--dir", type=Path, default=build.EXERCISES,
                         help="exercises folder holding solutions/ (default: %(default)s)")
    p_grade = commands.add_parser("grade", help="run completed notebooks and print a table "
                                                "of results")
    p_grade.add_argument("paths", nargs="+", type=Path,
                         help="student notebooks, or folders of them")
    p_grade.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    p_grade.add_argument("--timeout", type=float, default=300,
                         help="seconds one notebook may run (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "build":
        return build.main(args.dir, check_only=args.check)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return grade.main(args.paths, args.csv, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
