"""A stage launch's record (orchestrator/records.py, issue 18 item 5): `status` and reports read it instead of every
trial run, and must say exactly what reading every run says: for a finished stage, one killed before it wrote its
record, one still running, a resumed launch whose reruns supersede stale runs, runs deleted or restored in the UI
afterwards, and one interrupted with Ctrl-C. Real SQLite MLflow stores, real demo shards, runs written as trials
write them (orchestrator.trial_callback), stages ended through the driver's own calls; no Ray."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import pytest

from orchestrator import records
from orchestrator.context import Options, stage_context
from orchestrator.records import RECORD_TAG, launch_members
from orchestrator.report import build_report, load_plan, results_frame
from orchestrator.report.runs import read_runs
from orchestrator.resume import STALE_TAG, plan_stage
from orchestrator.spec import load_spec
from orchestrator.stage_end import StageInterrupted, closing_stage
from orchestrator.status import print_status
from orchestrator.tracking import Tracker
from orchestrator.trial_callback import open_trial_run
from orchestrator.trials import expand_final, expand_sweep
from tests.orchestrator.helpers import write_spec

ROWS = [{"name": "CLIP", "method": {"name": "zeroshot"}}, {"name": "CoOp", "method": {"name": "coop"}}]


@pytest.fixture(autouse=True)
def same_clock(monkeypatch):
    """One machine's clock: no skew margin, so what the record holds is what is read (within the margin every run
    would be read live, and the record never tested)."""
    monkeypatch.setattr(records, "SKEW_MS", 0)


@pytest.fixture()
def store(tmp_path, demo_root, empty_store):
    path = write_spec(tmp_path / "s.yaml", demo_root, name="rec", rows=ROWS, seeds=(1, 2, 3))
    spec = load_spec(path)
    opts = Options(workdir=str(tmp_path / "wd")).resolved()
    (tmp_path / "wd").mkdir()
    shutil.copyfile(empty_store, tmp_path / "wd" / "mlflow.db")
    return path, spec, opts, Tracker(opts.tracking_uri, spec.name)


def _run_trial(trial, ctx, hm: float | None, status: str = "finished"):
    """A trial's run as a trial writes it: per-epoch and final metrics, then its status (None: still running)."""
    run = open_trial_run(trial, ctx)
    run.log_metrics({"loss": 1.0}, step=0)
    if hm is not None:
        final = {"base_acc": hm + 1, "novel_acc": hm - 1, "hm": hm}
        run.log_metrics(final, step=1)
        run.finish(status, final)
    return run


def _launch(spec, opts, tracker, hm: dict[str, float | None], trials=None, resume=False, close=True):
    """A sweep launch: its trials' runs with `hm` by trial id (None: left running), then ended by the driver's
    own call (with its record) unless `close` is False (a driver killed with SIGKILL)."""
    trials = trials or expand_sweep(spec, opts.workdir)
    parent = tracker.stage_run("sweep", spec.hash, resume)
    ctx = stage_context(spec, opts, tracker.experiment_id, parent)
    plan = plan_stage(trials, tracker, parent, ctx, resume)
    runs = {t.trial_id: _run_trial(t, ctx, hm[t.trial_id]) for t in plan.todo if t.trial_id in hm}
    if close:
        tracker.close_stage(parent)
    return parent, runs


def _status(spec, opts, full_read: bool) -> str:
    out = io.StringIO()
    assert print_status(spec, dataclasses.replace(opts, out=out, full_read=full_read)) == 0
    return out.getvalue()


def _report_files(path, opts, out: Path, full_read: bool) -> dict[str, str]:
    build_report(load_plan(path), out, opts.tracking_uri, opts.optuna_storage, full_read=full_read)
    return {f.name: f.read_text() for f in sorted(out.glob("*")) if f.suffix in (".csv", ".md", ".html")}


def assert_same_as_full_read(path, spec, opts, tmp_path: Path) -> str:
    """Every reader says the same from the records as from every run: runs read, report files, results frame,
    status; returns the status text."""
    plan = load_plan(path)
    assert read_runs(plan, opts.tracking_uri, all_stages=True) == read_runs(plan, opts.tracking_uri, all_stages=True,
                                                                            full_read=True)
    fast = _report_files(path, opts, tmp_path / "rep-records", False)
    assert fast and fast == _report_files(path, opts, tmp_path / "rep-full", True)
    for all_launches in (False, True):
        a = results_frame(path, opts.tracking_uri, all_launches=all_launches)
        b = results_frame(path, opts.tracking_uri, all_launches=all_launches, full_read=True)
        assert a.equals(b) and len(a)
    said = _status(spec, opts, False)
    assert said == _status(spec, opts, True)
    return said


def _from_record(tracker, parent: str) -> bool:
    return launch_members(tracker.client, tracker.experiment_id, tracker.client.get_run(parent))[1]


def test_a_finished_stage_is_read_from_its_record_and_says_what_every_run_says(store, tmp_path):
    path, spec, opts, tracker = store
    trials = expand_sweep(spec, opts.workdir)
    hm = {t.trial_id: 50.0 + i for i, t in enumerate(trials)}
    hm[trials[-1].trial_id] = None  # a trial that never finished (its worker died): still RUNNING
    parent, runs = _launch(spec, opts, tracker, hm)
    assert tracker.client.get_run(parent).data.tags[RECORD_TAG] == str(len(trials))
    assert _from_record(tracker, parent)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"sweep  run {parent} FINISHED: {len(trials) - 1} finished, 1 running" in said
    frame = results_frame(path, opts.tracking_uri)
    assert sorted(frame["metrics.hm"].dropna()) == sorted(v for v in hm.values() if v is not None)

    # The running trial ends after the record: read live, not as the record left it.
    late = trials[-1]
    runs_now = {r.data.tags["hisf.trial_id"]: r for r in tracker.children(parent)}
    from orchestrator.tracking import TrialRun as WorkerRun

    worker = WorkerRun(opts.tracking_uri, tracker.experiment_id, parent, late.trial_id,
                       {"hisf.identity": runs_now[late.trial_id].data.tags["hisf.identity"]}, {})
    worker.log_metrics({"base_acc": 81.0, "novel_acc": 79.0, "hm": 80.0}, step=1)
    worker.finish("finished")
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"{len(trials)} finished" in said and 80.0 in set(results_frame(path, opts.tracking_uri)["metrics.hm"])

    # Deleted in the MLflow UI after the record, then restored: left out, then back, as in a full read.
    gone = runs[trials[0].trial_id].run_id
    tracker.client.delete_run(gone)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert gone not in set(results_frame(path, opts.tracking_uri).run_id) and f"{len(trials) - 1} finished" in said
    tracker.client.restore_run(gone)
    assert_same_as_full_read(path, spec, opts, tmp_path)
    assert gone in set(results_frame(path, opts.tracking_uri).run_id)

    # The record is what is read: a tag edited by hand afterwards (the documented limit) shows only in a full read.
    tracker.client.set_tag(gone, "hisf.row", "Edited")
    plan = load_plan(path)
    fast, full = read_runs(plan, opts.tracking_uri), read_runs(plan, opts.tracking_uri, full_read=True)
    assert {r.row for r in fast.runs if r.run_id == gone} == {trials[0].row}
    assert {r.row for r in full.runs if r.run_id == gone} == {"Edited"}


def test_a_stage_killed_before_its_record_falls_back_to_its_runs(store, tmp_path):
    path, spec, opts, tracker = store
    trials = expand_sweep(spec, opts.workdir)
    first, _ = _launch(spec, opts, tracker, {t.trial_id: 40.0 for t in trials})
    # A newer launch whose driver was killed (SIGKILL): its parent stays RUNNING with no record.
    killed, _ = _launch(spec, opts, tracker, {t.trial_id: 60.0 for t in trials[:2]} | {trials[2].trial_id: None},
                        close=False)
    assert RECORD_TAG not in tracker.client.get_run(killed).data.tags and not _from_record(tracker, killed)
    assert _from_record(tracker, first)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"sweep  run {killed} RUNNING: 2 finished, 1 running" in said
    frame = results_frame(path, opts.tracking_uri)
    assert set(frame.launch) == {killed} and sorted(frame["metrics.hm"].dropna()) == [60.0, 60.0]

    # `--resume` of the first launch: its record stops being current the moment the launch is continued.
    parent = tracker.stage_run("sweep", spec.hash, resume=True)
    assert parent == killed and RECORD_TAG not in tracker.client.get_run(parent).data.tags
    tracker.close_stage(parent)
    assert _from_record(tracker, killed)
    assert "2 finished, 1 running" in assert_same_as_full_read(path, spec, opts, tmp_path)
    # Resumed again and killed once more, after one more trial finished: the old record is not used.
    parent = tracker.stage_run("sweep", spec.hash, resume=True)
    ctx = stage_context(spec, opts, tracker.experiment_id, parent)
    _run_trial(trials[3], ctx, 70.0)
    assert not _from_record(tracker, parent)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"sweep  run {parent} RUNNING: 3 finished, 1 running" in said


def test_a_resumed_launch_supersedes_its_stale_runs_through_the_record(tmp_path, demo_root, empty_store):
    rows = [{"name": "CoOp", "method": {"name": "coop"}},
            {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}]
    search = {"n_trials": 2, "seed": 1, "pruner": "none", "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}}
    path = write_spec(tmp_path / "s.yaml", demo_root, name="recstale", rows=rows, search=search)
    spec = load_spec(path)
    opts = Options(workdir=str(tmp_path / "wd")).resolved()
    (tmp_path / "wd").mkdir()
    shutil.copyfile(empty_store, tmp_path / "wd" / "mlflow.db")
    tracker = Tracker(opts.tracking_uri, spec.name)

    def final(lam: float, hm: float, resume: bool) -> tuple[str, dict]:
        trials = expand_final(spec, opts.workdir, {("HISF", "demo", ()): {"method.lambda_le": lam}})
        parent = tracker.stage_run("final", spec.hash, resume)
        ctx = stage_context(spec, opts, tracker.experiment_id, parent)
        plan = plan_stage(trials, tracker, parent, ctx, resume)
        runs = {t.trial_id: _run_trial(t, ctx, hm).run_id for t in plan.todo}
        tracker.close_stage(parent)
        return parent, runs

    parent, old = final(0.5, 50.0, resume=False)
    same, new = final(1.5, 65.0, resume=True)  # a later search's value: HISF reruns, CoOp is reused
    assert same == parent and list(new) == ["final-hisf-demo-s1"]
    stale = old["final-hisf-demo-s1"]
    assert STALE_TAG in tracker.client.get_run(stale).data.tags and _from_record(tracker, parent)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"final  run {parent} FINISHED: 2 finished, 1 stale" in said
    frame = results_frame(path, opts.tracking_uri)
    assert set(frame.run_id) == {old["final-coop-demo-s1"], new["final-hisf-demo-s1"]}
    plan = load_plan(path)
    assert stale not in {r.run_id for r in read_runs(plan, opts.tracking_uri).runs if not r.stale}


def test_an_interrupted_stage_writes_its_record_after_marking_what_it_cut_short(store, tmp_path):
    path, spec, opts, tracker = store
    trials = expand_sweep(spec, opts.workdir)
    parent = tracker.stage_run("sweep", spec.hash, resume=False)
    ctx = stage_context(spec, opts, tracker.experiment_id, parent)
    with pytest.raises(StageInterrupted):
        with closing_stage("sweep", tracker, parent, 0.0) as info:
            info.total = len(trials)
            _run_trial(trials[0], ctx, 55.0)
            _run_trial(trials[1], ctx, None)  # cut short by Ctrl-C
            raise KeyboardInterrupt
    assert tracker.client.get_run(parent).info.status == "KILLED" and _from_record(tracker, parent)
    said = assert_same_as_full_read(path, spec, opts, tmp_path)
    assert f"sweep  run {parent} KILLED: 1 finished, 1 interrupted" in said
