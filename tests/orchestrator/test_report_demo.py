"""`hisf-bench report` on the MLflow store and Optuna storage of a real demo sweep (Ray, engine, tiny CLIP)."""

from __future__ import annotations

import json
import statistics

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orch_helpers import run_cli, write_spec
from tests.orchestrator.report_fixtures import chromium, console_errors, png_colours

pytestmark = pytest.mark.timeout(500)
ROWS = [
    {"name": "CLIP", "method": {"name": "zeroshot"}},
    {"name": "MaPLe", "method": {"name": "maple", "depth": 2}},
    {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True},
]
SEARCH = {"sampler": "tpe", "n_trials": 3, "startup_trials": 2, "seed": 1, "metric": "val_acc", "pruner": "none",
          "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}, "method.lambda_sa": {"low": 0.0, "high": 2.0}}}


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory, demo_root):
    """search (3 trials) + final with seeds 1, 2; the report's spec asks for seeds 1, 2, 3."""
    tmp = tmp_path_factory.mktemp("demo_sweep")
    spec = write_spec(tmp / "ran.yaml", demo_root, name="rdemo", rows=ROWS, search=SEARCH, seeds=(1, 2), epochs=1)
    out = run_cli(["run", spec], cwd=tmp, timeout=450)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wanted = yaml.safe_load(spec.read_text())
    wanted["final"]["seeds"] = [1, 2, 3]  # seed 3 never ran: the report must mark it missing
    (tmp / "report.yaml").write_text(yaml.safe_dump(wanted, sort_keys=False))
    return tmp


def _final_runs(uri):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("rdemo")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`hisf.stage` = 'final'", max_results=1000)
    return exp.experiment_id, [r for r in runs if "hisf.trial_id" in r.data.tags]


def test_report_of_a_real_demo_sweep(demo_sweep, tmp_path):
    wd = demo_sweep / "hisf-bench"
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    exp_id, runs = _final_runs(uri)
    assert len(runs) == 6  # 3 rows x 2 seeds, all finished
    # One more finished run disappears (deleted in MLflow): MaPLe is then left with seed 1 only.
    maple2 = next(r for r in runs if r.data.tags["hisf.row"] == "MaPLe" and r.data.tags["hisf.seed"] == "2")
    MlflowClient(uri).delete_run(maple2.info.run_id)
    runs = [r for r in runs if r.info.run_id != maple2.info.run_id]

    out = run_cli(["report", demo_sweep / "report.yaml", "--workdir", wd, "--out", tmp_path / "rep"], cwd=demo_sweep)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"report: {tmp_path / 'rep' / 'index.html'}" in out.stdout
    assert "(5/9 seeded runs finished, 3 cell(s) incomplete)" in out.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in out.stdout

    df = pd.read_parquet(tmp_path / "rep" / "table_base2new.parquet")
    ours = df[(df.kind == "ours") & (df.section == "demo")].set_index(["row", "column"])
    for row in ("CLIP", "MaPLe", "HISF"):
        mine = sorted((r for r in runs if r.data.tags["hisf.row"] == row), key=lambda r: int(r.data.tags["hisf.seed"]))
        for metric in ("base_acc", "novel_acc", "hm"):
            vals = [r.data.metrics[metric] for r in mine]
            rec = ours.loc[(row, metric)]
            assert rec["n"] == len(vals) and rec["expected"] == 3
            assert rec["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-9)
            if len(vals) > 1:
                assert rec["std"] == pytest.approx(statistics.stdev(vals), abs=1e-9)
            else:
                assert pd.isna(rec["std"])
            assert rec["status"] == "partial"
            assert rec["run_ids"].split(",") == [r.info.run_id for r in mine]
        assert ours.loc[(row, "hm")]["missing_seeds"] == ("2,3" if row == "MaPLe" else "3")
    md = (tmp_path / "rep" / "table_base2new.md").read_text()
    assert md.count("(n=2/3)") == 2 * 3 * 2 and md.count("(n=1/3)") == 3 * 2  # demo + Average sections
    # The demo (a tiny random-weight CLIP, 4 shots, one demo dataset) is not made as the paper's numbers: no
    # paper rows beside it, and the table says why.
    assert set(df.kind) == {"ours"}
    assert ("No paper rows beside this table: its average is over 1 dataset(s) (demo not among them), the paper's "
            "over the 11 of Table 1; it trains with 4 shots, the paper with 16; its backbone is hisf-tiny (random "
            "weights), the paper's ViT-B-16 with its pretrained weights") in md

    for png in (tmp_path / "rep" / "figures").glob("*.png"):
        assert png.stat().st_size > 10_000 and png_colours(png) > 50
    assert len(list((tmp_path / "rep" / "figures").glob("bars_*.png"))) == 3
    storage = f"sqlite:///{wd / 'optuna.db'}"
    studies = [s for s in optuna.study.get_all_study_names(storage) if s.startswith("rdemo:")]
    assert len(studies) == 1
    study = optuna.load_study(study_name=studies[0], storage=storage)
    best = json.loads(next((tmp_path / "rep" / "studies").glob("*_best.json")).read_text())
    assert best["study"] == studies[0] and best["best_params"] == study.best_params
    assert best["best_trial_mlflow_run_id"]  # the search run the orchestrator cross-linked
    html = next((tmp_path / "rep" / "studies").glob("*.html"))
    assert html.stat().st_size > 3_000_000

    shot = tmp_path / "shot.png"
    proc = chromium(["--window-size=1280,2000", f"--screenshot={shot}", (tmp_path / "rep" / "index.html").as_uri()],
                     tmp_path / "profile")
    assert proc.returncode == 0 and not console_errors(proc.stderr)
    assert png_colours(shot) > 200
