"""A report table is built from one launch (MLflow parent run) and says which (issue 15, item 1): never a table
from two launches, never a stale run that `--resume` replaced. Real SQLite MLflow store, known numbers."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.report import build_report, plan_from_dict
from tests.orchestrator.report.helpers import spec_dict

ROWS = [{"name": "CLIP", "method": {"name": "zeroshot"}}, {"name": "HISF", "method": {"name": "hisf"}}]


def _launch(client, exp, start, runs, spec_hash=""):
    """A final-stage parent run started at `start` (ms) with child runs {(row, seed): (hm, extra tags)}."""
    tags = {"hisf.stage": "final", "hisf.kind": "stage"} | ({"hisf.spec_hash": spec_hash} if spec_hash else {})
    parent = client.create_run(exp, tags=tags, start_time=start).info.run_id
    ids = {}
    for i, ((row, seed), (hm, extra)) in enumerate(runs.items()):
        run = client.create_run(exp, start_time=start + 10 + i, tags={
            "mlflow.parentRunId": parent, "hisf.stage": "final", "hisf.trial_id": f"final-{row}-s{seed}",
            "hisf.row": row, "hisf.dataset": "caltech101", "hisf.seed": str(seed), "hisf.status": "finished", **extra})
        client.log_batch(run.info.run_id, params=[Param("seed", str(seed))],
                         metrics=[Metric(k, v, 0, 0) for k, v in {"base_acc": hm, "novel_acc": hm, "hm": hm}.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[(row, seed)] = run.info.run_id
    client.set_terminated(parent, "FINISHED")
    return parent, ids


def test_each_table_comes_from_the_latest_launch_and_names_it(tmp_path):
    spec = spec_dict(name="launches", datasets=("caltech101",), rows=ROWS, seeds=(1, 2))
    plan = plan_from_dict(spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("launches")
    # An older launch, complete; then a newer one (e.g. after a new search) where HISF seed 2 has only the
    # stale run that `--resume` replaced and whose rerun has not finished.
    old, old_ids = _launch(client, exp, 1_000_000, {(r, s): (40.0 + s, {}) for r in ("CLIP", "HISF") for s in (1, 2)})
    new, new_ids = _launch(client, exp, 2_000_000, {
        ("CLIP", 1): (61.0, {}), ("CLIP", 2): (63.0, {}), ("HISF", 1): (70.0, {}),
        ("HISF", 2): (99.0, {"hisf.stale": "rerun as not the same trial: config: method.lambda_le 0.5 there, 1.2 now"}),
    }, spec_hash=plan.spec_hash)

    report = build_report(plan, tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    ours = pd.read_csv(report.tables["csv"], dtype={"missing_seeds": str, "launches": str}).query("kind == 'ours'").set_index(["section", "row", "column"])
    clip, hisf = ours.loc[("caltech101", "CLIP", "hm")], ours.loc[("caltech101", "HISF", "hm")]
    assert clip["mean"] == pytest.approx(62.0) and clip["n"] == 2
    assert clip["run_ids"] == f"{new_ids[('CLIP', 1)]},{new_ids[('CLIP', 2)]}"
    # Seed 2 of HISF: not the older launch's 42, not the stale 99: missing until the rerun finishes.
    assert hisf["mean"] == pytest.approx(70.0) and hisf["n"] == 1 and hisf["missing_seeds"] == "2"
    assert hisf["run_ids"] == new_ids[("HISF", 1)]
    assert set(ours["launches"].dropna()) == {new}
    assert report.table.launch.run_id == new and [o.run_id for o in report.table.other_launches] == [old]

    md = report.tables["md"].read_text()
    assert f"Source: Every cell comes from one final launch: MLflow parent run {new}, started" in md
    assert f"spec hash {plan.spec_hash}." in md and f"1 other final/sweep launch(es) not used: final {old}." in md
    index = report.index.read_text()
    assert f"MLflow parent run {new}" in index and f"MLflow run(s) of launch {new}" in index


def test_a_launch_of_another_spec_version_is_said_so(tmp_path):
    spec = spec_dict(name="edited", datasets=("caltech101",), rows=ROWS[:1], seeds=(1,))
    plan = plan_from_dict(spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("edited")
    _launch(client, exp, 1_000_000, {("CLIP", 1): (50.0, {})}, spec_hash="0123456789ab")
    report = build_report(plan, tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    assert (f"spec hash 0123456789ab (the spec's hash is now {plan.spec_hash}: these runs are of an earlier "
            "version of the spec)") in report.tables["md"].read_text()
