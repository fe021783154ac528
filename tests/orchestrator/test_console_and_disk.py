"""A real demo sweep as a user sees it: a progress line and no Ray chatter on the console (Ray's output in the
stage log), no training checkpoints left behind once trials are on record, MLflow names that say what a run is."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.results import FINAL_KEY, STATUS_KEY, group_result
from orchestrator.resume import DropFinishedCheckpoints
from orchestrator.spec import SpecError, load_spec
from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = pytest.mark.timeout(400)

# What Ray printed on the console before (issue 10, item 8); none of it may reach the console by default.
CHATTER = [r"Configuration for experiment", r"╭", r"TensorBoard", r"Checkpoint successfully created",
           r"RAY_DEDUP_LOGS", r"Token authentication", r"View detailed results", r"Trial status",
           r"\(tune_trainable pid=", r"Creating initial MLflow database tables"]
ROWS = [{"name": "CoOp", "method": {"name": "coop"}}, {"name": "HISF", "method": {"name": "hisf", "depth": 2}}]


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_dir() or p.suffix != ".json") if root.is_dir() else []


@pytest.mark.slow
def test_sweep_console_progress_log_and_no_checkpoints_left(tmp_path, demo_root):
    spec = write_spec(tmp_path / "c.yaml", demo_root, name="quiet", epochs=2, seeds=(1,), rows=ROWS)
    out = run_cli(["sweep", spec], cwd=tmp_path, timeout=360)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    console = out.stdout + out.stderr
    wd = tmp_path / "hisf-bench"
    log = wd / "logs" / "quiet-sweep.log"
    assert f"[sweep] Ray's output: {log}" in out.stdout
    progress = [ln for ln in out.stdout.splitlines() if re.match(r"\[sweep\] \d+/2 finished, \d+ running", ln)]
    assert progress and progress[-1].startswith("[sweep] 2/2 finished, 0 running, 0 failed, 0 pruned")
    assert "ETA 0:00" in progress[-1]
    for pattern in CHATTER:
        assert not re.search(pattern, console), f"Ray chatter on the console: {pattern!r}\n{console[-3000:]}"
    kept = log.read_text()
    for pattern in ("Configuration for experiment", "Checkpoint successfully created"):
        assert pattern in kept, pattern

    # Disk: nothing of the training checkpoints remains (engine folder, Tune's copy); the record does.
    assert _files(wd / "runs", "state.pt") == [] and _files(wd / "runs", "checkpoint") == []
    assert _files(wd / "ray_results", "checkpoint_*") == []
    for trial in ("sweep-coop-demo-s1", "sweep-hisf-demo-s1"):
        for name in ("prompts.pt", "config.yaml", "metrics.json"):
            assert (wd / "runs" / "quiet" / trial / name).is_file(), (trial, name)
        assert not (wd / "runs" / "quiet" / trial / "worker.pid").exists()  # no process runs a finished trial

    # MLflow: the experiment opens as model training; rows name the method, dataset, seed and grid point.
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quiet")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["CoOp · demo · seed 1", "HISF · demo · seed 1", "sweep"]
    assert sum(1 for r in runs if r.info.run_name == "sweep" and r.data.tags["hisf.kind"] == "stage") == 1

    # A finished sweep resumed: nothing reruns (Ray does not even start), nothing comes back.
    again = run_cli(["sweep", spec, "--resume"], cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 trials, 2 already finished, running 0" in again.stdout
    assert len(mlflow_children(uri, "quiet")) == 2
    assert _files(wd / "runs", "state.pt") == []


@pytest.mark.slow
def test_keep_checkpoints_and_verbose_show_what_the_default_hides(tmp_path, demo_root):
    spec = write_spec(tmp_path / "k.yaml", demo_root, name="kept", epochs=2, seeds=(1,), rows=ROWS[:1])
    d = yaml.safe_load(spec.read_text())
    d["resources"]["keep_checkpoints"] = True
    d["grid"] = {"method.n_ctx": [2]}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    out = run_cli(["sweep", spec, "--verbose"], cwd=tmp_path, timeout=360)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "Configuration for experiment" in console and "Checkpoint successfully created" in console
    assert re.search(r"\[sweep\] 1/1 finished, 0 running, 0 failed, 0 pruned", out.stdout)
    wd = tmp_path / "hisf-bench"
    assert [p.relative_to(wd).parts[:3] for p in _files(wd / "runs", "state.pt")] == [("runs", "kept", "sweep-coop-demo-n_ctx2-s1")]
    assert len(_files(wd / "ray_results", "checkpoint_*")) == 1
    (run,) = mlflow_children(f"sqlite:///{wd / 'mlflow.db'}", "kept")
    assert run.info.run_name == "CoOp · demo · seed 1 · n_ctx=2"


def test_tune_copy_goes_only_for_trials_on_record(tmp_path):
    fs = pafs.LocalFileSystem()

    def trial(name, last, members):
        root = tmp_path / name
        for sub in ("checkpoint_000000", "checkpoint_000001", "other"):
            (root / sub).mkdir(parents=True)
            (root / sub / "f").write_text("x")
        # What Tune hands the callback: the group's payload as its config, its last report as its result.
        return SimpleNamespace(path=str(root), storage=SimpleNamespace(storage_filesystem=fs), last_result=last,
                               config={"group": {"members": [{"trial_id": m} for m in members]}})

    def done(*statuses):
        return group_result({f"m{i}": {STATUS_KEY: s} for i, s in enumerate(statuses)})

    cases = {
        "finished": (done("finished"), ["m0"]),
        "pruned": (done("pruned"), ["m0"]),
        "group_done": (done("finished", "pruned"), ["m0", "m1"]),
        "failed": (done("failed"), ["m0"]),                           # a bad config: kept for inspection
        "group_one_failed": (done("finished", "failed"), ["m0", "m1"]),  # the failed member resumes from them
        "interrupted": ({STATUS_KEY: "running", FINAL_KEY: False}, ["m0"]),  # not on record: kept for --resume
        "empty": ({}, ["m0"]),
    }
    cb = DropFinishedCheckpoints(tmp_path)
    for name, (last, members) in cases.items():
        cb.on_trial_complete(0, [], trial(name, last, members))
    left = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in cases}
    assert left["finished"] == left["pruned"] == left["group_done"] == ["other"]
    kept = ["checkpoint_000000", "checkpoint_000001", "other"]
    assert left["failed"] == left["group_one_failed"] == left["interrupted"] == left["empty"] == kept


def test_keep_checkpoints_is_validated(tmp_path, demo_root):
    spec = write_spec(tmp_path / "b.yaml", demo_root, rows=ROWS[:1])
    d = yaml.safe_load(spec.read_text())
    assert load_spec(spec).resources.keep_checkpoints is False
    d["resources"]["keep_checkpoints"] = "yes"
    spec.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match=r"b\.yaml.*resources\.keep_checkpoints: expected true or false, got 'yes'"):
        load_spec(spec)


def test_run_names_of_search_and_final_trials(tmp_path, demo_root):
    from orchestrator.trials import expand_final, search_groups, search_trial

    spec = load_spec(write_spec(tmp_path / "n.yaml", demo_root, name="names", seeds=(2,), rows=[
        {"name": "CLIP", "method": {"name": "zeroshot"}}, {"name": "HISF", "method": {"name": "hisf", "depth": 2},
                                                            "search": True}],
        search={"n_trials": 2, "seed": 1, "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}}))
    (group,) = search_groups(spec, "tag")
    t = search_trial(spec, group, 3, 7, {"method.lambda_le": 0.123456}, tmp_path)
    assert t.run_name == "HISF · demo · seed 1 · trial 3 · lambda_le=0.1235"
    final = expand_final(spec, tmp_path, {("HISF", "demo", ()): {"method.lambda_le": 1.5}})
    assert sorted(t.run_name for t in final) == ["CLIP · demo · seed 2", "HISF · demo · seed 2 · lambda_le=1.5"]


def test_experiment_kind_tag_on_new_and_older_experiments(tmp_path):
    from orchestrator.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("older")  # made before the tag existed
    mine = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("fresh", "older", "chosen"):
        Tracker(uri, name)
    kinds = {name: client.get_experiment_by_name(name).tags.get("mlflow.experimentKind")
             for name in ("fresh", "older", "chosen")}
    assert kinds == {"fresh": "custom_model_development", "older": "custom_model_development",
                     "chosen": "genai_development"}  # a kind the user set stays
    assert client.get_experiment_by_name("older").experiment_id == old and mine
