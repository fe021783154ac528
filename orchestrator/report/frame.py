"""A spec's results as a pandas DataFrame for a notebook: one row per member trial run of the latest launch of each
stage, with its tags, params and final metrics (`from orchestrator.report import results_frame`)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.context import DEFAULT_WORKDIR, default_tracking_uri

from .plan import load_plan
from .runs import read_runs

# The leading columns; then `params.<key>` and `metrics.<name>`, each sorted.
COLUMNS = ("stage", "row", "dataset", "seed", "status", "trial_id", "run_id", "launch", "start_time")


def latest_launches(tracked, stages=None) -> dict[str, str]:
    """Stage -> its latest launch (parent run id): the newest stage parent run of that stage with trial runs."""
    newest: dict[str, tuple[int, str]] = {}
    parents = {r.parent_run_id for r in tracked.runs}
    for run_id, launch in tracked.launches.items():
        if run_id in parents and (stages is None or launch.stage in stages):
            if launch.stage not in newest or launch.start_time > newest[launch.stage][0]:
                newest[launch.stage] = (launch.start_time, run_id)
    return {stage: run_id for stage, (_, run_id) in newest.items()}


def results_frame(spec_path: str | Path, tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR,
                  stages: tuple[str, ...] | None = None, all_launches: bool = False, full_read: bool = False):
    """The spec's member trial runs (no stage or group runs), stale runs (replaced on `--resume`) left out: those of
    each stage's latest launch (every launch with `all_launches`), `stages` (default all: search, final, sweep) only.

    Columns: stage, row, dataset, seed, status (finished | failed | pruned | running), trial_id, run_id, launch (its
    stage parent run), start_time (ms), then `params.<key>` (as logged: strings) and `metrics.<name>` (each metric's
    last value: a finished trial's final metrics). Tracking URI default: the workdir's store. Launches are read from
    their records (orchestrator/records.py) where current; `full_read` reads every run instead (same result)."""
    import pandas as pd

    plan = load_plan(spec_path)
    tracked = read_runs(plan, tracking_uri or default_tracking_uri(workdir), all_stages=True, full_read=full_read)
    wanted = None if all_launches else set(latest_launches(tracked, stages).values())
    records = []
    for run in tracked.runs:
        if run.stale or (stages is not None and run.stage not in stages):
            continue
        if wanted is not None and run.parent_run_id not in wanted:
            continue
        records.append({"stage": run.stage, "row": run.row, "dataset": run.dataset, "seed": run.seed,
                        "status": run.status, "trial_id": run.tags.get("hisf.trial_id", ""), "run_id": run.run_id,
                        "launch": run.parent_run_id, "start_time": run.start_time,
                        **{f"params.{k}": v for k, v in sorted(run.params.items())},
                        **{f"metrics.{k}": v for k, v in sorted(run.metrics.items())}})
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    rest = sorted(c for c in frame.columns if c not in COLUMNS)
    frame = frame[list(COLUMNS) + rest].astype({"seed": "Int64"})
    return frame.sort_values(["stage", "row", "dataset", "seed", "trial_id"], kind="stable").reset_index(drop=True)
