"""MLflow tracking: one experiment per spec, a parent run per stage, one child run per trial (never two).

Layout (docs/interfaces.md): parent runs tagged `hisf.stage`; child runs tagged `mlflow.parentRunId`,
`hisf.trial_id`, `hisf.identity` and the trial's facts, params = `TrialConfig.flatten()`, per-epoch metrics
with step=epoch, final metrics, and the engine's artifacts. A retried or resumed trial finds its run by
(parent run, `hisf.trial_id`, `hisf.identity`) and continues it; the same trial id with another identity
gets a new run (orchestrator/resume.py decides which runs are reused).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator import records
from orchestrator.records import clear_record
from orchestrator.store_retry import quiet_mlflow_http_retries, retry

log = logging.getLogger(__name__)

_MAX_BATCH = 900  # MLflow's log_batch limit is 1000 entries
# MLflow 3's UI opens an experiment by this tag: without it an experiment with no traces lands on the GenAI
# overview ("Traces: 0"); this value opens the runs table (the value set in mlflow's server js bundle).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


quiet_mlflow_http_retries()


def _retry(fn: Callable[[], Any], what: str = "MLflow call") -> Any:
    """A locked SQLite store, an `mlflow server` or its database away for a while: wait (bounded, logged) and
    try again (orchestrator.store_retry)."""
    return retry(fn, what)


def open_tracker(spec, opts) -> "Tracker":
    """The spec's experiment in the options' store; a local store's artifacts go under the workdir."""
    local = opts.tracking_uri.startswith("sqlite:") or opts.tracking_uri.startswith("file:")
    artifacts = (Path(opts.workdir) / "mlartifacts").as_uri() if local else None
    Path(opts.workdir).mkdir(parents=True, exist_ok=True)
    return Tracker(opts.tracking_uri, spec.name, artifact_root=artifacts)


def find_tracker(spec, opts) -> "Tracker | None":
    """The spec's experiment when the store already holds it; None otherwise (nothing created)."""
    uri = opts.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    try:
        if _retry(lambda: MlflowClient(uri).get_experiment_by_name(spec.name)) is None:
            return None
    except Exception:  # an unreachable server: nothing to read
        return None
    return Tracker(uri, spec.name)


class Tracker:
    """Driver side: the experiment and the stage's parent run."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        exp = _retry(lambda: self.client.get_experiment_by_name(experiment))
        if exp is None:
            exp_id = _retry(lambda: self.client.create_experiment(experiment, artifact_location=artifact_root,
                                                                  tags=EXPERIMENT_KIND))
        else:
            exp_id = exp.experiment_id
            # Experiments created before the tag existed (or by hand) get it too; a user's own kind stays.
            if "mlflow.experimentKind" not in exp.tags:
                for k, v in EXPERIMENT_KIND.items():
                    _retry(lambda: self.client.set_experiment_tag(exp_id, k, v))
        self.experiment_id = exp_id

    def stage_run(self, stage: str, spec_hash: str, resume: bool, extra_tags: Mapping[str, str] | None = None) -> str:
        """The stage's parent run: with `resume`, the latest one of this stage (continued); else a new one."""
        if resume:
            runs = _retry(lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`hisf.stage` = '{stage}' and tags.`hisf.kind` = 'stage'",
                order_by=["attributes.start_time DESC"], max_results=1))
            if runs:
                run_id = runs[0].info.run_id
                # The launch changes from here on: its record (orchestrator/records.py) stops being current.
                _retry(lambda: clear_record(self.client, run_id, runs[0].data.tags))
                _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
                return run_id
        tags = {"hisf.stage": stage, "hisf.kind": "stage", "hisf.spec_hash": spec_hash, "hisf.git_commit": git_commit()}
        tags.update(extra_tags or {})
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=stage))
        return run.info.run_id

    def latest_stage_run(self, stage: str, finished_only: bool = False):
        flt = f"tags.`hisf.stage` = '{stage}' and tags.`hisf.kind` = 'stage'"
        if finished_only:
            flt += " and attributes.status = 'FINISHED'"
        runs = _retry(lambda: self.client.search_runs([self.experiment_id], filter_string=flt,
                                                      order_by=["attributes.start_time DESC"], max_results=1))
        return runs[0] if runs else None

    def children(self, parent_run_id: str) -> list:
        """The launch's child runs, read now from the store (what the driver decides on)."""
        return _retry(lambda: records.children(self.client, self.experiment_id, parent_run_id))

    def members(self, parent, use_record: bool = True) -> list:
        """The launch's child runs as `children` gives them, from its record when current (orchestrator/records.py):
        what `status` reads."""
        return _retry(lambda: records.launch_members(self.client, self.experiment_id, parent, use_record))[0]

    def close_stage(self, run_id: str, status: str = "FINISHED", classes: Mapping[str, Any] | None = None) -> None:
        """End the stage's parent run with its record written first (with `classes`: trial id -> the per-class
        results its trial reported). A record that cannot be written (the store failing, a second Ctrl-C) is left
        out: readers then search the launch's runs."""
        try:
            _retry(lambda: records.write_record(self.client, self.experiment_id, run_id, classes),
                   "MLflow write the launch's record")
        except (Exception, KeyboardInterrupt) as e:
            log.warning("launch %s: no record written (%s: %s); readers will search its runs", run_id,
                        type(e).__name__, e)
        self.end_stage(run_id, status)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        _retry(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def end_stage(self, run_id: str, status: str = "FINISHED") -> None:
        _retry(lambda: self.client.set_terminated(run_id, status))


def open_group_run(tracking_uri: str, experiment_id: str, parent_run_id: str, group_id: str,
                   members: Mapping[str, str]) -> str:
    """Worker side: the MLflow run of a fused group (docs/fusion.md), a child of the stage's parent run tagged
    `hisf.kind=group`, linking its members (`hisf.group.members`: trial ids, `hisf.group.runs`: their runs, in the
    same order); found again by (parent, `hisf.group_id`) on a retry. Returns its run id. Members' own runs stay
    the stage's children (the runs table, `status`, reports and `--resume` read those)."""
    client = MlflowClient(tracking_uri)
    flt = (f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`hisf.kind` = 'group' "
           f"and tags.`hisf.group_id` = '{group_id}'")
    found = _retry(lambda: client.search_runs([experiment_id], filter_string=flt, max_results=1))
    tags = {"hisf.group.members": ",".join(members), "hisf.group.runs": ",".join(members.values()),
            "hisf.group_size": str(len(members))}
    if found:
        run_id = found[0].info.run_id
        _retry(lambda: client.update_run(run_id, status="RUNNING"))
        _retry(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]))
        return run_id
    tags.update({"mlflow.parentRunId": parent_run_id, "hisf.kind": "group", "hisf.group_id": group_id})
    run = _retry(lambda: client.create_run(experiment_id, tags=tags, run_name=f"group of {len(members)} · {group_id}"))
    return run.info.run_id


def end_group_run(tracking_uri: str, run_id: str, failed: bool, metrics: Mapping[str, float]) -> None:
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    _retry(lambda: client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]))
    _retry(lambda: client.set_terminated(run_id, "FAILED" if failed else "FINISHED"))


class TrialRun:
    """Worker side: the child run of one trial, found or created by (parent, trial id, and the identity when
    `tags` hold `hisf.identity`)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                 tags: Mapping[str, Any], params: Mapping[str, Any], run_name: str | None = None):
        self.client = MlflowClient(tracking_uri)
        flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`hisf.trial_id` = '{trial_id}'"
        if tags.get("hisf.identity"):
            flt += f" and tags.`hisf.identity` = '{tags['hisf.identity']}'"
        all_tags = {"mlflow.parentRunId": parent_run_id, "hisf.trial_id": trial_id, "hisf.status": "running"}
        all_tags.update({k: str(v) for k, v in tags.items()})

        def find_or_create():
            # Each attempt looks first: a create whose answer was lost in a blink made the run already.
            found = self.client.search_runs([experiment_id], filter_string=flt, max_results=1,
                                            order_by=["attributes.start_time DESC"])
            if found:
                return found[0], True
            return self.client.create_run(experiment_id, tags=all_tags, run_name=run_name or trial_id), False

        run, self.resumed = _retry(find_or_create, "MLflow find or create the trial's run")
        self.run_id = run.info.run_id
        logged = run.data.params if self.resumed else {}
        if self.resumed:
            _retry(lambda: self.client.update_run(self.run_id, status="RUNNING"))
        # A param may be logged once; a resumed run re-logs only what is missing (same values anyway).
        todo = [Param(k, param_str(v)) for k, v in params.items() if k not in logged]
        for i in range(0, len(todo), _MAX_BATCH):
            chunk = todo[i:i + _MAX_BATCH]
            _retry(lambda: self.client.log_batch(self.run_id, params=chunk))

    def next_attempt(self) -> int:
        """1 on a trial's first start, +1 on each retry or resume (kept as the `hisf.attempts` tag)."""
        run = _retry(lambda: self.client.get_run(self.run_id))
        return int(run.data.tags.get("hisf.attempts", "0")) + 1

    def tags(self) -> dict[str, str]:
        return dict(_retry(lambda: self.client.get_run(self.run_id)).data.tags)

    def latest_metrics(self) -> dict[str, float]:
        return dict(_retry(lambda: self.client.get_run(self.run_id)).data.metrics)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in _retry(lambda: self.client.get_metric_history(self.run_id, key))}

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(ms), _MAX_BATCH):
            chunk = ms[i:i + _MAX_BATCH]
            _retry(lambda: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifacts(self, artifacts: Mapping[str, str]) -> None:
        for name, path in artifacts.items():
            if path and Path(path).is_file():
                _retry(lambda: self.client.log_artifact(self.run_id, path))
            elif path and Path(path).is_dir():
                _retry(lambda: self.client.log_artifacts(self.run_id, path, artifact_path=name))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _retry(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def finish(self, status: str, metrics: Mapping[str, Any] | None = None) -> None:
        self.set_tags({"hisf.status": status})
        if metrics:
            _retry(lambda: self.client.log_dict(self.run_id, dict(metrics), "final_metrics.json"))
        _retry(lambda: self.client.set_terminated(self.run_id, "FINISHED" if status != "failed" else "FAILED"))

    def fail(self, message: str) -> None:
        self.set_tags({"hisf.status": "failed", "hisf.error": message[:4000]})
        _retry(lambda: self.client.set_terminated(self.run_id, "FAILED"))


def param_str(v: Any) -> str:
    """A config value as the run's params hold it (what reports and identity checks compare against)."""
    s = json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
    return s[:6000]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
