"""Reading the trial runs behind a report out of MLflow (the tracking layout of docs/interfaces.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import ViewType

from .plan import ReportError, ReportPlan, Variant

# Stages whose runs fill the tables; search-stage runs only feed the Optuna study reports.
TABLE_STAGES = ("final", "sweep")


@dataclass(frozen=True)
class TrialRun:
    run_id: str
    experiment_id: str
    stage: str
    row: str
    dataset: str
    seed: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    status: str  # hisf.status (finished | failed | pruned), or "running" while the trial has none yet
    start_time: int
    tags: dict[str, str] = field(default_factory=dict)

    def variant(self, plan: ReportPlan) -> Variant:
        return Variant(self.row, tuple((k, self.params.get(k, "")) for k in plan.grid_keys))


@dataclass(frozen=True)
class TrackedRuns:
    experiment_id: str
    runs: tuple[TrialRun, ...]
    # Study names of the latest search stage (its parent run's `optuna.studies` tag), None if no stage says.
    studies: tuple[str, ...] | None = None


def check_tracking_uri(uri: str) -> None:
    """A sqlite store that does not exist would be created empty; say so instead of reporting nothing."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.is_file():
            raise ReportError(f"--tracking-uri {uri}: no MLflow store at {db} (run the spec first, or pass its store)")


def read_runs(plan: ReportPlan, tracking_uri: str) -> TrackedRuns:
    """Every child trial run of the spec's experiment, all stages, newest first."""
    check_tracking_uri(tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.get_experiment_by_name(plan.name)
        if experiment is None:
            raise ReportError(
                f"{tracking_uri}: no MLflow experiment named {plan.name!r} (spec `name`); run the spec first"
            )
        found = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string="tags.`hisf.trial_id` != ''",
            run_view_type=ViewType.ACTIVE_ONLY,
            output_format="list",
            order_by=["attributes.start_time DESC"],
        )
        stages = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string="tags.`hisf.kind` = 'stage' and tags.`hisf.stage` = 'search'",
            output_format="list",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    finally:
        mlflow.set_tracking_uri(previous)
    studies = None
    if stages and stages[0].data.tags.get("optuna.studies"):
        studies = tuple(stages[0].data.tags["optuna.studies"].split(","))
    runs = []
    for r in found:
        tags = dict(r.data.tags)
        seed = tags.get("hisf.seed") or r.data.params.get("seed")
        runs.append(
            TrialRun(
                run_id=r.info.run_id,
                experiment_id=r.info.experiment_id,
                stage=tags.get("hisf.stage", ""),
                row=tags.get("hisf.row", ""),
                dataset=tags.get("hisf.dataset", ""),
                seed=int(seed) if seed not in (None, "") else None,
                params=dict(r.data.params),
                metrics=dict(r.data.metrics),
                status=tags.get("hisf.status") or ("running" if r.info.status == "RUNNING" else r.info.status.lower()),
                start_time=r.info.start_time or 0,
                tags=tags,
            )
        )
    return TrackedRuns(experiment.experiment_id, tuple(runs), studies)


def table_runs(plan: ReportPlan, tracked: TrackedRuns) -> dict[tuple[Variant, str, int], TrialRun]:
    """The one run per (variant, dataset, seed) that a table cell uses.

    A finished final-stage run wins over a sweep-stage one, and the newest wins among equals (a rerun
    of a trial after a failure); runs of rows, datasets or seeds the spec does not list are ignored.
    """
    wanted = set(plan.variants)
    chosen: dict[tuple[Variant, str, int], TrialRun] = {}
    rank = {stage: i for i, stage in enumerate(TABLE_STAGES)}
    for run in tracked.runs:  # newest first
        if run.stage not in rank or run.status != "finished" or run.seed not in plan.seeds:
            continue
        variant = run.variant(plan)
        if variant not in wanted or run.dataset not in plan.datasets:
            continue
        key = (variant, run.dataset, run.seed)
        if key not in chosen or rank[run.stage] < rank[chosen[key].stage]:
            chosen[key] = run
    return chosen


def pending_runs(plan: ReportPlan, tracked: TrackedRuns) -> dict[tuple[Variant, str], list[TrialRun]]:
    """Table-stage runs that have not finished (running, failed, pruned), by cell: the report shows them."""
    out: dict[tuple[Variant, str], list[TrialRun]] = {}
    for run in tracked.runs:
        if run.stage in TABLE_STAGES and run.status != "finished":
            out.setdefault((run.variant(plan), run.dataset), []).append(run)
    return out
