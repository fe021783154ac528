"""Reading the trial runs behind a report out of MLflow (the tracking layout of docs/interfaces.md), and
choosing the one launch (stage parent run) each table is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .plan import ReportError, ReportPlan, Variant

# Stages whose runs fill the tables; search-stage runs only feed the Optuna study reports.
TABLE_STAGES = ("final", "sweep")
# A run `--resume` replaced by a rerun of the same trial id with another identity (orchestrator/resume.py).
STALE_TAG = "hisf.stale"


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
    # Its per-class results when its launch's record carries them (orchestrator/records.py; else read from its
    # eval/ artifacts): not part of what the run is, so a record and a full read give equal runs.
    classes: dict | None = field(default=None, compare=False, repr=False)

    @property
    def parent_run_id(self) -> str:
        """The launch (stage parent run) the run belongs to."""
        return self.tags.get("mlflow.parentRunId", "")

    @property
    def stale(self) -> bool:
        return STALE_TAG in self.tags

    def variant(self, plan: ReportPlan) -> Variant:
        return Variant(self.row, tuple((k, self.params.get(k, "")) for k in plan.grid_keys))


@dataclass(frozen=True)
class Launch:
    """One run of a stage command (its MLflow parent run), with everything `--resume` added to it."""

    run_id: str
    stage: str
    start_time: int
    spec_hash: str = ""


@dataclass(frozen=True)
class TrackedRuns:
    experiment_id: str
    runs: tuple[TrialRun, ...]
    # Study names of the latest search stage (its parent run's `optuna.studies` tag), None if no stage says.
    studies: tuple[str, ...] | None = None
    # The table stages' parent runs, by run id.
    launches: dict[str, Launch] = field(default_factory=dict)


def check_tracking_uri(uri: str) -> None:
    """A sqlite store that does not exist would be created empty; say so instead of reporting nothing."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.is_file():
            raise ReportError(f"--tracking-uri {uri}: no MLflow store at {db} (run the spec first, or pass its store)")


def read_runs(plan: ReportPlan, tracking_uri: str, all_stages: bool = False, full_read: bool = False) -> TrackedRuns:
    """Every child trial run of the spec's experiment, all stages, newest first; `launches` holds the table stages'
    parent runs (every stage's with `all_stages`).

    A launch with a current record (orchestrator/records.py) gives its runs from it; every other trial run (a
    launch still running, or killed before it wrote one; runs logged by hand) is searched, as all of them are
    with `full_read`. Both give the same runs."""
    from mlflow.tracking import MlflowClient

    from orchestrator.records import launch_members, search_all

    check_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(plan.name)
    if experiment is None:
        raise ReportError(f"{tracking_uri}: no MLflow experiment named {plan.name!r} (spec `name`); run the spec first")
    exp_id = experiment.experiment_id
    stages = search_all(client, exp_id, "tags.`hisf.kind` = 'stage'")
    found, recorded = [], []
    for parent in stages if not full_read else ():
        members, from_record = launch_members(client, exp_id, parent)
        if from_record:
            recorded.append(parent.info.run_id)
            found += [r for r in members if r.data.tags.get("hisf.trial_id", "") != ""]
    # The rest, searched: trial runs under no launch with a record (MLflow's `!=` needs the tag, so runs with no
    # parent at all are asked for apart).
    rest = "tags.`hisf.trial_id` != ''"
    if recorded:
        found += search_all(client, exp_id, rest + "".join(f" and tags.`mlflow.parentRunId` != '{p}'" for p in recorded))
        found += search_all(client, exp_id, rest + " and tags.`mlflow.parentRunId` IS NULL")
    else:
        found = search_all(client, exp_id, rest)
    found.sort(key=lambda r: (-(r.info.start_time or 0), r.info.run_id))  # MLflow's order: newest, then run id
    studies = None
    searches = [r for r in stages if r.data.tags.get("hisf.stage") == "search"]
    if searches and searches[0].data.tags.get("optuna.studies"):
        studies = tuple(searches[0].data.tags["optuna.studies"].split(","))
    launches = {r.info.run_id: Launch(r.info.run_id, r.data.tags.get("hisf.stage", ""), r.info.start_time or 0,
                                      r.data.tags.get("hisf.spec_hash", ""))
                for r in stages if all_stages or r.data.tags.get("hisf.stage") in TABLE_STAGES}
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
                classes=getattr(r, "classes", None),
            )
        )
    return TrackedRuns(exp_id, tuple(runs), studies, launches)


def table_launches(tracked: TrackedRuns) -> list[Launch]:
    """The launches whose trial runs could fill a table, best first: final before sweep, then newest."""
    found: dict[str, Launch] = {}
    for run in tracked.runs:
        if run.stage in TABLE_STAGES and not run.stale:
            known = tracked.launches.get(run.parent_run_id)
            if known is None:  # a parent not recorded as a stage (runs logged by hand): dated by its runs
                prior = found.get(run.parent_run_id)
                known = Launch(run.parent_run_id, run.stage, min(run.start_time, prior.start_time if prior else run.start_time))
            found[run.parent_run_id] = known
    rank = {stage: i for i, stage in enumerate(TABLE_STAGES)}
    return sorted(found.values(), key=lambda ln: (rank.get(ln.stage, len(rank)), -ln.start_time))


def table_runs(plan: ReportPlan, tracked: TrackedRuns, launch: Launch | None = None) -> dict[tuple[Variant, str, int], TrialRun]:
    """The one run per (variant, dataset, seed) that a table cell uses, all from one launch (default: the
    first of `table_launches`), so a table never mixes runs of two launches (e.g. earlier searched values).

    Stale runs (replaced by a rerun of the same trial) are left out, and the newest wins among equals (a
    rerun after a failure); runs of rows, datasets or seeds the spec does not list are ignored.
    """
    launch = launch or next(iter(table_launches(tracked)), None)
    if launch is None:
        return {}
    wanted = set(plan.variants)
    chosen: dict[tuple[Variant, str, int], TrialRun] = {}
    for run in _of_launch(tracked, launch):  # newest first
        if run.status != "finished" or run.seed not in plan.seeds:
            continue
        variant = run.variant(plan)
        if variant not in wanted or run.dataset not in plan.datasets:
            continue
        chosen.setdefault((variant, run.dataset, run.seed), run)
    return chosen


def pending_runs(plan: ReportPlan, tracked: TrackedRuns, launch: Launch | None = None) -> dict[tuple[Variant, str], list[TrialRun]]:
    """The launch's runs that have not finished (running, failed, pruned), by cell: the report shows them."""
    launch = launch or next(iter(table_launches(tracked)), None)
    out: dict[tuple[Variant, str], list[TrialRun]] = {}
    for run in _of_launch(tracked, launch) if launch else ():
        if run.status != "finished":
            out.setdefault((run.variant(plan), run.dataset), []).append(run)
    return out


def _of_launch(tracked: TrackedRuns, launch: Launch) -> list[TrialRun]:
    return [r for r in tracked.runs if r.parent_run_id == launch.run_id and r.stage == launch.stage and not r.stale]
