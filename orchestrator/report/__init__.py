"""`hisf-bench report SPEC`: the paper's tables, figures and Optuna study reports from tracked runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from orchestrator.context import DEFAULT_WORKDIR, default_optuna_storage, default_tracking_uri

from .build import DEFAULT_UI_URL, Report, build_report
from .frame import results_frame
from .plan import ReportError, ReportPlan, load_plan, plan_from_dict

__all__ = ["main", "build_report", "Report", "ReportPlan", "ReportError", "load_plan", "plan_from_dict", "results_frame"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hisf-bench report", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("spec", help="experiment spec (experiments/*.yaml)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="the run commands' --workdir, where the default stores are (default: ./hisf-bench)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    parser.add_argument("--optuna-storage", dest="storage", default=None, metavar="URL",
                        help="Optuna storage URL, as `run` takes it (default: sqlite:///<workdir>/optuna.db)")
    parser.add_argument("--storage", dest="storage", help=argparse.SUPPRESS)  # the flag's earlier name
    parser.add_argument("--out", default=None, help="report folder (default: <workdir>/reports/<spec name>)")
    parser.add_argument("--ui-url", default=DEFAULT_UI_URL, help=f"MLflow UI address for links (default {DEFAULT_UI_URL})")
    parser.add_argument("--full-read", action="store_true",
                        help="read every trial run from MLflow instead of each launch's record (orchestrator/records.py): slower; for runs edited by hand after their stage ended")
    args = parser.parse_args(argv)
    import os

    # The worst-classes section downloads each run's eval/ records: no progress bar per file on the console.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        plan = load_plan(args.spec)
        out = Path(args.out) if args.out else Path(args.workdir) / "reports" / plan.name
        tracking_uri = args.tracking_uri or default_tracking_uri(args.workdir)
        storage = args.storage or default_optuna_storage(args.workdir)
        report = build_report(plan, out, tracking_uri, storage, args.ui_url, full_read=args.full_read)
    except (ReportError, ValueError) as e:
        print(f"hisf-bench report: {e}", file=sys.stderr)
        return 2
    from .index import missing_summary

    done, total, notes = missing_summary(report.table)
    print(f"report: {report.index.resolve()}  ({done}/{total} seeded runs finished"
          + (f", {len(notes)} cell(s) incomplete" if notes else "") + ")")
    if report.environments.mixed:
        print(f"  warning: {report.environments.note()}")
    print(f"  open it:         xdg-open {report.index.resolve()}  (or file://{report.index.resolve()})")
    print(f"  MLflow UI:       mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1  ->  {args.ui_url}")
    print(f"  Optuna dashboard: optuna-dashboard {shlex.quote(storage)}  (pip install optuna-dashboard)")
    return 0
