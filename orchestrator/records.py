"""A stage launch's record: its child runs (info, tags, params, latest metrics) in one artifact on the stage's
parent run, written when the stage ends, so `status` and reports read one file per launch instead of every run.

MLflow's `search_runs` has no column projection: reading 10,000 runs moves ~820,000 param, tag and metric rows
through the server and the client (~45 s on a 2-core box). The record holds the same values, taken from that
same search once, when the driver ends the stage (stage_end.closing_stage and finish_stage, Ctrl-C included).

A record is used only while it is current: the parent run carries `hisf.records` (how many child runs the
record covers) and is not RUNNING. A `--resume` launch deletes the tag before it touches anything (its parent
is reused), and the tag is set only after the artifact is complete, so a driver killed with SIGKILL, or a
stage still running, leaves no current record and readers search the parent's children instead. What changed
after the snapshot is read live and replaces the record's entries: runs created, ended or still running since
(MLflow's start/end times, with SKEW_MS for clocks of other nodes), and runs deleted or restored in the UI.
Not seen: a tag or param edited by hand on an ended run after the record, and runs removed for good by
`mlflow gc`; `hisf-bench report --full-read` (and `status --full-read`) read every run instead.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag, ViewType

RECORD_TAG = "hisf.records"  # number of child runs the record covers; present only while the record is current
RECORD_TIME_TAG = "hisf.records.time"  # ms (driver clock) when the snapshot began
ARTIFACT_DIR = "hisf"
ARTIFACT = f"{ARTIFACT_DIR}/records.json.gz"
VERSION = 1
# Runs ended or created this long before the snapshot began are read live again: other nodes' clocks may lag.
SKEW_MS = 10_000
PAGE = 1000
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

log = logging.getLogger(__name__)


@dataclass
class RecordedInfo:
    run_id: str
    experiment_id: str
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str


@dataclass
class RecordedData:
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RecordedRun:
    """A run as the record holds it: the `info` and `data` fields of an MLflow Run that readers use."""

    info: RecordedInfo
    data: RecordedData
    # What its trial reported of its per-class results (orchestrator/results.CLASSES_KEY), when it did.
    classes: dict[str, dict[str, list]] | None = None


def search_all(client, experiment_id: str, filter_string: str, view=ViewType.ACTIVE_ONLY) -> list:
    """Every run of the experiment matching the filter, newest first (MLflow's order: start time, then run id)."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=view,
                                  max_results=PAGE, order_by=["attributes.start_time DESC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def children(client, experiment_id: str, parent_run_id: str, view=ViewType.ACTIVE_ONLY, extra: str = "") -> list:
    return search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'{extra}", view)


def _entry(run, classes: dict | None = None) -> dict[str, Any]:
    i, d = run.info, run.data
    entry = {"run_id": i.run_id, "experiment_id": i.experiment_id, "status": i.status, "start_time": i.start_time,
             "end_time": i.end_time, "lifecycle_stage": i.lifecycle_stage,
             "tags": dict(d.tags), "params": dict(d.params), "metrics": dict(d.metrics)}
    if classes:
        entry["classes"] = classes
    return entry


def _run(e: dict[str, Any]) -> RecordedRun:
    return RecordedRun(RecordedInfo(e["run_id"], e["experiment_id"], e["status"], e["start_time"], e["end_time"],
                                    e["lifecycle_stage"]), RecordedData(e["tags"], e["params"], e["metrics"]),
                       e.get("classes"))


def _finished(run) -> bool:
    return run.info.status == "FINISHED" and run.data.tags.get("hisf.status") == "finished"


def write_record(client, experiment_id: str, parent_run_id: str, classes: dict[str, Any] | None = None) -> int:
    """Snapshot the launch's child runs (deleted ones too, so a later restore is seen) into the parent's record
    artifact, then mark it current; returns how many runs it covers. `classes` (trial id -> what its trial
    reported of its per-class results) goes with a finished run of that trial: one run per trial and launch."""
    began = int(time.time() * 1000)
    runs = children(client, experiment_id, parent_run_id, ViewType.ALL)
    classes = classes or {}
    # A `--resume` of the launch reports only the trials it ran: the others' come from the launch's last record.
    earlier = _recorded_classes(client, parent_run_id)

    def reported(run) -> dict | None:
        if not _finished(run):
            return None
        return classes.get(run.data.tags.get("hisf.trial_id", "")) or earlier.get(run.info.run_id)

    payload = {"version": VERSION, "time": began, "runs": [_entry(r, reported(r)) for r in runs]}
    with tempfile.TemporaryDirectory(prefix="hisf-records-") as tmp:
        path = Path(tmp) / Path(ARTIFACT).name
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
        client.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)
    # One batch: both tags appear together, after the artifact is whole.
    client.log_batch(parent_run_id, tags=[RunTag(RECORD_TAG, str(len(runs))), RunTag(RECORD_TIME_TAG, str(began))])
    return len(runs)


def _recorded_classes(client, parent_run_id: str) -> dict[str, dict]:
    """run id -> the per-class results the parent's last record carried (current or not: a finished run's never
    change); {} without a readable one."""
    try:
        with tempfile.TemporaryDirectory(prefix="hisf-records-") as tmp, _no_progress_bar():
            if not any(a.path == ARTIFACT for a in client.list_artifacts(parent_run_id, ARTIFACT_DIR)):
                return {}
            path = client.download_artifacts(parent_run_id, ARTIFACT, tmp)
            with gzip.open(path, "rt", encoding="utf-8") as f:
                payload = json.load(f)
        return {e["run_id"]: e["classes"] for e in payload.get("runs", ()) if e.get("classes")}
    except Exception:  # noqa: BLE001 - none, or torn by a driver killed mid-upload: downloads will do
        return {}


def clear_record(client, parent_run_id: str, tags: dict[str, str] | None = None) -> None:
    """The launch is about to change (a `--resume` continues it): its record is no longer current."""
    tags = tags if tags is not None else client.get_run(parent_run_id).data.tags
    if RECORD_TAG in tags:
        client.delete_tag(parent_run_id, RECORD_TAG)


def read_record(client, parent) -> tuple[list[RecordedRun], int] | None:
    """(the runs of the parent run's current record, its snapshot time), or None when it has none current."""
    tags = parent.data.tags
    if parent.info.status == "RUNNING" or RECORD_TAG not in tags or RECORD_TIME_TAG not in tags:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="hisf-records-") as tmp, _no_progress_bar():
            path = client.download_artifacts(parent.info.run_id, ARTIFACT, tmp)
            with gzip.open(path, "rt", encoding="utf-8") as f:
                payload = json.load(f)
    except Exception as e:  # noqa: BLE001 - a record that cannot be read: search the children instead
        log.warning("launch %s: its record could not be read (%s); reading its runs", parent.info.run_id, e)
        return None
    if payload.get("version") != VERSION or len(payload.get("runs", ())) != int(tags[RECORD_TAG]) \
            or str(payload.get("time")) != tags[RECORD_TIME_TAG]:
        return None
    return [_run(e) for e in payload["runs"]], int(payload["time"])


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a progress bar per download on stderr unless told not to: not for one small file."""
    was = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = was


def launch_members(client, experiment_id: str, parent, use_record: bool = True) -> tuple[list, bool]:
    """The parent run's active child runs as a full search gives them now, newest first (start time, then run
    id), and whether its record supplied them: the record with what changed since read live, else a search."""
    found = read_record(client, parent) if use_record else None
    if found is None:
        return children(client, experiment_id, parent.info.run_id), False
    recorded, began = found
    pid, since = parent.info.run_id, began - SKEW_MS
    runs: dict[str, Any] = {r.info.run_id: r for r in recorded}
    deleted_now = {r.info.run_id for r in children(client, experiment_id, pid, ViewType.DELETED_ONLY)}
    for run_id in [k for k, r in runs.items() if r.info.lifecycle_stage != "active" and k not in deleted_now]:
        try:  # deleted at the snapshot, not now: restored, or removed for good
            runs[run_id] = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - gone
            del runs[run_id]
    for run_id in deleted_now:
        runs.pop(run_id, None)
    for extra in (f" and attributes.start_time >= {since}", f" and attributes.end_time >= {since}",
                  " and attributes.status = 'RUNNING'"):
        for r in children(client, experiment_id, pid, extra=extra):
            runs[r.info.run_id] = r
    # A finished run read live again keeps what its trial reported of its per-class results: it is never reopened.
    carried = {r.info.run_id: r.classes for r in recorded if r.classes}
    for run_id, classes in carried.items():
        r = runs.get(run_id)
        if r is not None and not isinstance(r, RecordedRun) and _finished(r):
            runs[run_id] = _run(_entry(r, classes))
    live = [r for r in runs.values() if r.info.lifecycle_stage == "active"]
    return sorted(live, key=lambda r: (-(r.info.start_time or 0), r.info.run_id)), True
