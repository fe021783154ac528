"""The stale-resume bug of issue 15 (item 1), reproduced with real stages: after `run`, a fresh `search` finds
other values; `final --resume` must not attach the earlier final runs (trained with the earlier values). It reruns
them, says why, and the report's table comes from the new runs of one launch."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _best(storage: str, study: str) -> float:
    return optuna.load_study(study_name=study, storage=storage).best_params["method.lambda_le"]


def test_final_resume_after_a_new_search_reruns_the_trials_it_changed(tmp_path, demo_root):
    spec = write_spec(tmp_path / "s.yaml", demo_root, name="stale", epochs=1, seeds=(1,), rows=[
        {"name": "CLIP", "method": {"name": "zeroshot"}},
        {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True},
    ], search={"n_trials": 2, "startup_trials": 1, "seed": 1, "pruner": "none",
               "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}})
    wd = tmp_path / "hisf-bench"
    uri, storage = f"sqlite:///{wd / 'mlflow.db'}", f"sqlite:///{wd / 'optuna.db'}"
    first = run_cli(["run", spec], cwd=tmp_path, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    old_final = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "stale", "final")}
    assert sorted(old_final) == ["final-clip-demo-s1", "final-hisf-demo-s1"]
    old_lambda = float(old_final["final-hisf-demo-s1"].data.params["method.lambda_le"])
    (parent,) = {r.data.tags["mlflow.parentRunId"] for r in old_final.values()}

    # A fresh search (another search seed) finds another λ_le.
    d = yaml.safe_load(spec.read_text())
    d["search"]["seed"] = 2
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    second = run_cli(["search", spec], cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stale")
    search_parents = client.search_runs([exp.experiment_id], "tags.`hisf.stage` = 'search' and tags.`hisf.kind` = 'stage'",
                                        order_by=["attributes.start_time DESC"])
    assert len(search_parents) == 2
    new_lambda = _best(storage, search_parents[0].data.tags["optuna.studies"])
    assert new_lambda != pytest.approx(old_lambda)

    # (status and --dry-run say the same beforehand: test_resume_identity.py, without Ray)
    resumed = run_cli(["final", spec, "--resume"], cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[final] 2 trials, 0 already finished, running 2 (MLflow parent run {parent})" in resumed.stdout
    assert "[final] 2 recorded trial(s) rerun as not the same trial now: spec hash differs for 2" in resumed.stdout
    assert f"config differs for 1 (method.lambda_le {old_lambda} there, {new_lambda} now)" in resumed.stdout

    runs = mlflow_children(uri, "stale", "final")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent} and len(runs) == 4
    stale = {r.info.run_id for r in runs if "hisf.stale" in r.data.tags}
    assert stale == {r.info.run_id for r in old_final.values()}  # the earlier runs, marked, not reused
    fresh = {r.data.tags["hisf.trial_id"]: r for r in runs if r.info.run_id not in stale}
    assert sorted(fresh) == sorted(old_final)
    assert all(r.data.tags["hisf.status"] == "finished" for r in fresh.values())
    assert float(fresh["final-hisf-demo-s1"].data.params["method.lambda_le"]) == pytest.approx(new_lambda)
    assert {r.data.tags["hisf.search_run"] for r in fresh.values()} == {search_parents[0].info.run_id}

    # The report's cells are the new runs, and it names the launch they come from.
    report = run_cli(["report", spec], cwd=tmp_path, timeout=200)
    assert report.returncode == 0, report.stdout + report.stderr
    out = wd / "reports" / "stale"
    assert f"Every cell comes from one final launch: MLflow parent run {parent}" in (out / "table_base2new.md").read_text()
    df = pd.read_csv(out / "table_base2new.csv", dtype=str).query("kind == 'ours' and section == 'demo' and column == 'hm'")
    assert sorted(df.run_ids) == sorted(fresh[t].info.run_id for t in ("final-clip-demo-s1", "final-hisf-demo-s1"))
    assert set(df.launches) == {parent}
    # ... read from the launch's record (written when the resumed final ended), as reading every run gives it.
    assert client.get_run(parent).data.tags["hisf.records"] == "4"
    full = run_cli(["report", spec, "--full-read", "--out", str(tmp_path / "full")], cwd=tmp_path, timeout=200)
    assert full.returncode == 0, full.stdout + full.stderr
    assert (tmp_path / "full" / "table_base2new.csv").read_text() == (out / "table_base2new.csv").read_text()
