"""Search then final on local Ray with the real engine: MLflow layout, Optuna links, metrics equal a direct run."""


import optuna
import pytest
from mlflow.tracking import MlflowClient

from hisf.config import TrialConfig, replace_path
from hisf.engine import run_trial
from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = pytest.mark.timeout(400)


def test_run_search_then_final(tmp_path, demo_root):
    spec = write_spec(tmp_path / "s.yaml", demo_root, name="stages", seeds=(1, 2), rows=[
        {"name": "CoOp", "method": {"name": "coop"}},
        {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True},
    ], search={"n_trials": 3, "startup_trials": 1, "seed": 1, "pruner": "none",
               "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}, "method.lambda_sa": {"low": 0.0, "high": 2.0}}})
    out = run_cli(["run", spec], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wd = tmp_path / "hisf-bench"
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out.stdout
    assert f"optuna-dashboard sqlite:///{wd / 'optuna.db'}" in out.stdout
    assert "hisf-bench report" in out.stdout
    assert "[search] done" in out.stdout and "3 finished" in out.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stages")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hisf.kind") == "stage"]
    assert sorted(r.data.tags["hisf.stage"] for r in parents) == ["final", "search"]
    search_runs = mlflow_children(uri, "stages", "search")
    final_runs = mlflow_children(uri, "stages", "final")
    assert sorted(r.data.tags["hisf.trial_id"] for r in search_runs) == [f"search-hisf-demo-t{i}" for i in range(3)]
    assert sorted(r.data.tags["hisf.trial_id"] for r in final_runs) == [
        "final-coop-demo-s1", "final-coop-demo-s2", "final-hisf-demo-s1", "final-hisf-demo-s2"]

    # Optuna <-> MLflow cross-links, and the final HISF runs use the study's best values.
    (study_name,) = {r.data.tags["optuna.study"] for r in search_runs}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{wd / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    by_id = {r.info.run_id: r for r in search_runs}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.metrics["val_acc"] == pytest.approx(t.value)
        assert not {"base_acc", "novel_acc", "hm"} & set(run.data.metrics)  # no test-split numbers in a search
        assert float(run.data.params["method.lambda_le"]) == pytest.approx(t.params["method.lambda_le"])
    best = study.best_params
    for r in final_runs:
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        assert tags["hisf.status"] == "finished" and r.info.status == "FINISHED"
        assert tags["hisf.stage"] == "final" and tags["hisf.dataset"] == "demo" and tags["hisf.protocol"] == "base2new"
        assert tags["hisf.image_mode"] == "fast"  # how the dataset's images were built (data build --exact: exact)
        assert tags["hisf.seed"] == p["seed"]
        # Params hold the method keys the method reads: HISF's depth, not CoOp's (it prompts layer 0 only).
        assert tags["hisf.depth"] == p["method.depth"] if tags["hisf.row"] == "HISF" else "method.depth" not in p
        assert len(tags["hisf.spec_hash"]) == 12 and tags["hisf.git_commit"]
        if tags["hisf.row"] == "HISF":
            assert float(p["method.lambda_le"]) == pytest.approx(best["method.lambda_le"])
            assert float(p["method.lambda_sa"]) == pytest.approx(best["method.lambda_sa"])
        else:
            assert "method.lambda_le" not in p and p["method.name"] == "coop"  # CoOp does not read it
        b, n = m["base_acc"], m["novel_acc"]
        assert m["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert sorted({h.step for h in hist}) == [0, 1]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"prompts.pt", "config.yaml", "metrics.json"} <= arts
        # Orchestration (tracking, Tune, process start) is real but bounded: seconds, not the trial's minutes.
        assert m["engine_seconds"] > 0 and 0 < m["orchestration_seconds"] < 120

    # The orchestrator passes the config faithfully: a direct engine run of the logged config agrees exactly.
    r = next(r for r in final_runs if r.data.tags["hisf.trial_id"] == "final-hisf-demo-s2")
    cfg_path = client.download_artifacts(r.info.run_id, "config.yaml", str(tmp_path / "dl"))
    cfg = replace_path(TrialConfig.from_yaml(cfg_path), "output_dir", str(tmp_path / "direct"))
    direct = run_trial(cfg)
    for k in ("base_acc", "novel_acc", "hm", "val_acc", "train/loss"):
        assert r.data.metrics[k] == pytest.approx(direct[k], abs=1e-9), k

    status = run_cli(["status", spec], cwd=tmp_path)
    assert status.returncode == 0
    assert "search run" in status.stdout and "3 finished" in status.stdout and "4 finished" in status.stdout
    assert "'complete': 3" in status.stdout
