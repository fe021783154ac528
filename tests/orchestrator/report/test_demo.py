"""`hisf-bench report` on the MLflow store and Optuna storage of a real demo sweep (Ray, engine, tiny CLIP)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import run_cli, write_spec
from tests.orchestrator.report.helpers import chromium, console_errors, png_colours

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
    # Per-class results and confusion matrices of every evaluated split are in each run (the search's: validation).
    client = MlflowClient(uri)
    per_class = {}
    for r in runs:
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
        assert arts == {f"eval/{s}.{e}" for s in ("val", "base", "novel") for e in ("json", "png")}
        for split in ("base", "novel", "val"):
            rec = json.loads(Path(client.download_artifacts(r.info.run_id, f"eval/{split}.json",
                                                            str(tmp_path / "dl" / r.info.run_id))).read_text())
            assert rec["accuracy"] == r.data.metrics[f"{split}_acc"]  # the trace over the total: the metric exactly
            per_class[(r.info.run_id, split)] = dict(zip(rec["classnames"], rec["per_class_accuracy"]))
    search = [r for r in client.search_runs([exp_id], "tags.`hisf.stage` = 'search'") if "hisf.trial_id" in r.data.tags]
    assert search and all({a.path for a in client.list_artifacts(r.info.run_id, "eval")} ==
                          {"eval/val.json", "eval/val.png"} for r in search)  # no test split in a search
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
    # The demo section's worst classes: each seed's value is its run's own per-class accuracy.
    assert "Worst classes (the 5 lowest per-class test accuracies" in md
    worst = pd.read_csv(tmp_path / "rep" / "worst_classes.csv")
    by_seed = {(r.data.tags["hisf.row"], int(r.data.tags["hisf.seed"])): r.info.run_id for r in runs}
    assert set(worst.row) == {"CLIP", "MaPLe", "HISF"} and set(worst.split) == {"base", "novel"}
    for rec in worst.to_dict("records"):
        assert rec["accuracy"] == pytest.approx(per_class[(by_seed[(rec["row"], rec["seed"])], rec["split"])][rec["class"]])
    assert len(worst[(worst.row == "MaPLe") & (worst.split == "base")]) == 3  # 3 base classes, seed 1 alone
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


def test_predict_eval_and_results_frame_on_a_real_demo_sweep(demo_sweep, tmp_path):
    """The README's walk-through on a real sweep: predict and eval from a final run (by run id and by its trial folder),
    eval's run linked to it with the run's own per-class numbers, and the sweep as a DataFrame."""
    from PIL import Image

    from orchestrator.report import results_frame

    wd = demo_sweep / "hisf-bench"
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    exp_id, runs = _final_runs(uri)
    hisf = next(r for r in runs if r.data.tags["hisf.row"] == "HISF" and r.data.tags["hisf.seed"] == "1")
    folder = wd / "runs" / "rdemo" / hisf.data.tags["hisf.trial_id"]
    image = tmp_path / "shape.png"
    Image.new("RGB", (50, 40), (220, 30, 30)).save(image)
    answers = []
    for source in (hisf.info.run_id, folder):
        out = run_cli(["predict", source, image, "--workdir", wd, "--top-k", "2", "--json"], cwd=demo_sweep)
        assert out.returncode == 0, out.stderr[-3000:]
        answers.append(json.loads(out.stdout)["predictions"])
    assert answers[0] == answers[1] and len(answers[0][0]["top_k"]) == 2
    assert answers[0][0]["top_k"][0]["probability"] >= answers[0][0]["top_k"][1]["probability"]

    out = run_cli(["eval", hisf.info.run_id, "--workdir", wd, "--classes", "novel"], cwd=demo_sweep)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"top-1 {hisf.data.metrics['novel_acc']:.2f}%" in out.stdout
    new_id = out.stdout.split("MLflow run ")[1].split(":")[0]
    client = MlflowClient(uri)
    ev = client.get_run(new_id)
    assert ev.info.experiment_id == exp_id and ev.data.tags["hisf.source_run"] == hisf.info.run_id
    assert ev.data.metrics["novel_acc"] == hisf.data.metrics["novel_acc"]
    mine, theirs = (json.loads(Path(client.download_artifacts(rid, "eval/novel.json", str(tmp_path / rid))).read_text())
                    for rid in (new_id, hisf.info.run_id))
    assert mine["confusion"] == theirs["confusion"] and mine["per_class_accuracy"] == theirs["per_class_accuracy"]

    df = results_frame(demo_sweep / "ran.yaml", workdir=wd)
    final = df[df.stage == "final"].set_index("run_id")
    assert set(final.index) == {r.info.run_id for r in runs}  # eval's run is no trial run
    assert final.loc[hisf.info.run_id, "metrics.novel_acc"] == hisf.data.metrics["novel_acc"]
    assert final.loc[hisf.info.run_id, "params.method.name"] == "hisf" and final.loc[hisf.info.run_id, "seed"] == 1
    assert set(df.stage) == {"search", "final"} and len(df[df.stage == "search"]) == 3
