"""A search trial whose config only fails at trial start (a batch larger than its training set) is recorded as
failed (Optuna FAIL with the reason, MLflow FAILED with the reason) while the stage goes on; `--resume` of an
orphaned trial with the same fault does the same; no study trial and no parent run stays RUNNING."""

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _studies(storage: str) -> dict[str, optuna.Study]:
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def _stage_runs(uri: str, name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hisf.kind") == "stage"]


def test_a_config_error_in_a_search_trial_fails_the_trial_not_the_stage(tmp_path, demo_root):
    # Two studies (a grid over the batch size): batch 4 trains, batch 64 exceeds the 12 training samples (4 shots
    # x 3 base classes), which only the trial sees when it opens its data.
    spec = write_spec(tmp_path / "b.yaml", demo_root, name="badtrial", epochs=1, max_concurrent=2, rows=[
        {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}],
        search={"n_trials": 2, "sampler": "random", "seed": 1, "pruner": "none",
                "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}})
    d = yaml.safe_load(spec.read_text())
    d["grid"] = {"train.batch_size": [4, 64]}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    wd = tmp_path / "hisf-bench"
    uri, storage = f"sqlite:///{wd / 'mlflow.db'}", f"sqlite:///{wd / 'optuna.db'}"

    out = run_cli(["search", spec], cwd=tmp_path, timeout=500)
    console = out.stdout + out.stderr
    assert out.returncode == 1, console[-4000:]
    assert "Traceback" not in console and "did not include the specified metric" not in console, console[-4000:]
    assert "[search] done" in out.stdout, console[-4000:]
    studies = _studies(storage)
    assert len(studies) == 2
    for name, study in studies.items():
        states = sorted(t.state.name for t in study.trials)
        if "train.batch_size=64" in name:
            assert states == ["FAIL", "FAIL"], (name, states)
            for t in study.trials:
                assert "train.batch_size: 64" in t.user_attrs["fail_reason"], t.user_attrs
        else:
            assert states == ["COMPLETE", "COMPLETE"], (name, states)
    runs = mlflow_children(uri, "badtrial")
    assert len(runs) == 4
    failed = [r for r in runs if r.data.params["train.batch_size"] == "64"]
    assert len(failed) == 2
    for r in failed:
        assert r.info.status == "FAILED" and r.data.tags["hisf.status"] == "failed"
        assert "is more than the 12 training samples" in r.data.tags["hisf.error"]
        assert f"trial {r.data.tags['hisf.trial_id']} failed: bad trial config" in out.stdout
    assert all(r.info.status == "FINISHED" for r in runs if r not in failed)
    (parent,) = _stage_runs(uri, "badtrial")
    assert parent.info.status == "FAILED"  # a study without a completed trial: the stage did not succeed

    # A driver that died left an Optuna trial RUNNING in the failing study: `--resume` issues it again, and it
    # fails the same way, on record, without crashing the stage.
    (bad_name,) = [n for n in studies if "train.batch_size=64" in n]
    orphan = studies[bad_name].ask({"method.lambda_le": optuna.distributions.FloatDistribution(0.0, 2.0)})
    out = run_cli(["search", spec, "--resume"], cwd=tmp_path, timeout=500)
    console = out.stdout + out.stderr
    assert out.returncode == 1, console[-4000:]
    assert "Traceback" not in console and "running 1 " in out.stdout, console[-4000:]
    study = _studies(storage)[bad_name]
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL", "FAIL"]
    assert "train.batch_size: 64" in study.trials[orphan.number].user_attrs["fail_reason"]
    runs = mlflow_children(uri, "badtrial")
    assert len(runs) == 5 and not [r for r in runs if r.info.status == "RUNNING"]
    assert [p.info.status for p in _stage_runs(uri, "badtrial")] == ["FAILED"]
