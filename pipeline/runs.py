"""`poso runs`: each day's run of a home, newest first, as the dashboard lists them
(pipeline/dashboard/data.py reads ML Metadata and the run summaries)."""

from __future__ import annotations

import argparse

from pipeline import argtypes, versions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home")
    parser.add_argument("--last", type=argtypes.positive_int, default=None, metavar="N",
                        help="only the N most recent days (default: every day)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def rows(home: str, last=None):
    from pipeline.dashboard import data

    found = []
    for day in data.HomeReader(home).days()[:last]:
        summary = day.summary or {}
        run = day.latest_run
        found.append({
            "date": day.date, "status": day.status,
            "model": summary.get("variant"),  # None for an ingest-only day or a summary from before it was kept
            "blessed": summary.get("blessed") if summary else None,
            "pushed_version": int(summary["pushed_version"]) if summary.get("pushed") else None,
            "cached_steps": run.cached if run else None, "steps": len(run.components) if run else None,
            "seconds": round(day.seconds, 1) if day.seconds is not None else None,
            "rows": day.rows, "quarantined": day.quarantined})
    return found


def _cell(value, fmt="{}") -> str:
    return "-" if value is None else fmt.format(value)


def run(args: argparse.Namespace) -> int:
    found = rows(args.home, args.last)
    if versions.printed_as_json_or_empty(found, args.json, f"No runs in {args.home} yet."):
        return 0
    print(f"{'DATE':<11} {'STATUS':<12} {'MODEL':<10} {'BLESSED':<8} {'PUSHED':<11} {'CACHED':<7} {'TIME':>7} "
          f"{'ROWS':>9} {'QUARANTINED':>11}")
    for row in found:
        blessed = {True: "yes", False: "NO"}.get(row["blessed"], "-")
        cached = f"{row['cached_steps']}/{row['steps']}" if row["steps"] is not None else "-"
        print(f"{row['date']:<11} {row['status']:<12} {_cell(row['model']):<10} {blessed:<8} "
              f"{_cell(row['pushed_version']):<11} {cached:<7} "
              f"{_cell(row['seconds'], '{:.0f}s'):>7} {_cell(row['rows']):>9} {_cell(row['quarantined']):>11}")
    return 0
