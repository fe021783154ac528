"""MLflow layout on a real SQLite store: one parent per stage, one child per trial, retries never duplicate."""

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.context import default_tracking_uri
from orchestrator.resume import LaunchRuns
from orchestrator.tracking import Tracker, TrialRun


@pytest.fixture()
def uri(tmp_path):
    return default_tracking_uri(tmp_path)


def test_child_run_is_continued_not_duplicated(uri, tmp_path):
    tr = Tracker(uri, "spec-a", artifact_root=(tmp_path / "art").as_uri())
    parent = tr.stage_run("sweep", "h1", resume=False)
    params = {"method.depth": 9, "method.lambda_le": 0.5, "backbone.model_cfg": None}
    r1 = TrialRun(uri, tr.experiment_id, parent, "sweep-x-s1", {"hisf.seed": 1}, params)
    r1.log_metrics({"val_acc": 40.0, "train/loss": 1.5, "flag": True}, step=0)
    # a retry (new process, same trial id) continues the same run and re-logs params harmlessly
    r2 = TrialRun(uri, tr.experiment_id, parent, "sweep-x-s1", {"hisf.seed": 1}, params)
    assert r2.run_id == r1.run_id and r2.resumed and not r1.resumed
    r2.log_metrics({"val_acc": 55.0}, step=1)
    art = tmp_path / "prompts.pt"
    art.write_bytes(b"\x00" * 10)
    r2.log_artifacts({"prompts": str(art)})
    r2.finish("finished")
    other = TrialRun(uri, tr.experiment_id, parent, "sweep-x-s2", {"hisf.seed": 2}, params)
    other.fail("boom")
    c = MlflowClient(uri)
    children = tr.children(parent)
    assert sorted(r.data.tags["hisf.trial_id"] for r in children) == ["sweep-x-s1", "sweep-x-s2"]
    hist = c.get_metric_history(r1.run_id, "val_acc")
    assert [(m.step, m.value) for m in hist] == [(0, 40.0), (1, 55.0)]
    run = c.get_run(r1.run_id)
    assert run.data.params["method.depth"] == "9" and run.data.params["method.lambda_le"] == "0.5"
    assert run.data.tags["hisf.seed"] == "1" and run.data.tags["mlflow.parentRunId"] == parent
    assert "flag" not in run.data.metrics
    assert [a.path for a in c.list_artifacts(r1.run_id)] == ["prompts.pt"]
    assert [r.data.tags["hisf.trial_id"] for r in LaunchRuns.read(tr, parent, None).done()] == ["sweep-x-s1"]
    assert c.get_run(other.run_id).info.status == "FAILED"


def test_stage_run_resume_reuses_latest_parent(uri):
    tr = Tracker(uri, "spec-b")
    a = tr.stage_run("search", "h", resume=False)
    tr.end_stage(a)
    b = tr.stage_run("search", "h", resume=False)
    assert a != b
    assert tr.stage_run("search", "h", resume=True) == b
    assert tr.stage_run("final", "h", resume=True) not in (a, b)  # nothing to resume: a new one
    assert tr.latest_stage_run("search").info.run_id == b
    # same experiment by name on a second Tracker
    assert Tracker(uri, "spec-b").experiment_id == tr.experiment_id
