"""Assembling a report folder from a spec's MLflow runs and Optuna studies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.context import default_optuna_storage, default_tracking_uri

from .classes import read_worst_classes, write_worst_csv
from .environments import EnvironmentSummary, summarise_environments
from .export import write_tables
from .figures import bar_charts, depth_curve
from .index import RunLinks, write_index
from .plan import ReportPlan
from .runs import pending_runs, read_runs, table_launches, table_runs
from .studies import StudyReport, write_study_reports
from .tables import Table, build_table

# The per-class records of finished runs, kept beside the report they fed (orchestrator/report/classes.py).
CLASSES_CACHE = ".cache/classes"

DEFAULT_UI_URL = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class Report:
    out: Path
    index: Path
    table: Table
    tables: dict[str, Path]
    figures: list[Path]
    studies: list[StudyReport]
    environments: EnvironmentSummary


def build_report(plan: ReportPlan, out: Path, tracking_uri: str | None = None, storage: str | None = None,
                 ui_url: str = DEFAULT_UI_URL, full_read: bool = False) -> Report:
    tracking_uri = tracking_uri or default_tracking_uri()
    storage = storage or default_optuna_storage()
    tracked = read_runs(plan, tracking_uri, full_read=full_read)
    # One launch per table: cells never mix runs of two launches (docs/interfaces.md, tracking layout).
    launches = table_launches(tracked)
    launch = launches[0] if launches else None
    chosen = table_runs(plan, tracked, launch)
    table = build_table(plan, chosen, pending_runs(plan, tracked, launch), tracked.experiment_id, launch,
                        tuple(launches[1:]))
    out = Path(out)
    table.worst_classes = read_worst_classes(plan, chosen, tracking_uri, cache=out / CLASSES_CACHE)
    environments = summarise_environments(chosen.values())
    tables = write_tables(table, out, environments)
    worst_csv = write_worst_csv(table.worst_classes, out / "worst_classes.csv")
    if worst_csv is not None:
        tables["worst classes (csv)"] = worst_csv
    figures = bar_charts(table, out / "figures")
    curve = depth_curve(plan, table, out / "figures")
    if curve is not None:
        figures.insert(0, curve)
    links = RunLinks(ui_url, tracked.experiment_id)
    studies = write_study_reports(plan, storage, out / "studies", tracked, links.run)
    index = write_index(out, table, links, tables, figures, studies, tracking_uri, storage, environments)
    return Report(out, index, table, tables, figures, studies, environments)
