"""python -m fdfa.report <dirs> --out <dir>: the command line of the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from fdfa.errors import user_errors
from fdfa.report.make import make_report
from fdfa.report.tables import skip_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdfa.report",
        description="Compare finished runs: results.md, results.csv and PNG plots.",
    )
    parser.add_argument("dirs", nargs="+", help="sweep or run dirs (searched recursively)")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    with user_errors(exit=False) as errors:
        report = make_report(args.dirs, args.out)
    if errors.exit_code:
        return errors.exit_code
    n_runs = sum(len(row.runs) for row in report.rows)
    print(
        f"{n_runs} runs in {len(report.rows)} rows -> {Path(args.out) / 'results.md'}, "
        f"results.csv and {len(report.plots)} PNG plots"
    )
    if report.skipped:
        print(f"skipped {skip_summary(report.skipped)} (each with why: end of results.md)")
    return 0
