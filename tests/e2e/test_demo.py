"""README's main command: `hisf-bench run experiments/demo.yaml` end to end on embedded defaults."""

import math
import os
import re
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.support import ROOT


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_demo_spec_runs_search_then_final(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "experiments" / "demo.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wd = tmp_path / "hisf-bench"
    assert (wd / "data" / "demo" / "manifest.parquet").is_file()  # demo data built on the spot
    for line in ("mlflow ui --backend-store-uri", "optuna-dashboard sqlite:///", "hisf-bench report"):
        assert line in out.stdout
    # What the README promises a new user: a progress line per stage, none of Ray's own chatter.
    last = re.findall(r"^\[search\] (\d)/4 finished, 0 running, 0 failed, (\d) pruned · .* · best val_acc \d+\.\d\d$",
                      out.stdout, re.M)
    assert last and int(last[-1][0]) + int(last[-1][1]) == 4, out.stdout[-3000:]  # median pruning may stop some
    assert re.search(r"^\[final\] 15/15 finished, 0 running, 0 failed, 0 pruned · ", out.stdout, re.M), out.stdout[-3000:]
    for chatter in ("Configuration for experiment", "TensorBoard", "Checkpoint successfully created",
                    "RAY_DEDUP_LOGS", "Token authentication", "(tune_trainable pid=", "repeated",
                    "build it with", "hisf-bench data build"):  # (the run builds the demo data itself)
        assert chatter not in out.stdout + out.stderr, chatter
    # Nothing after the summary but the "Where things are" lines.
    tail = out.stdout.split("Where things are:", 1)[1]
    assert all(ln.startswith("  ") for ln in tail.strip("\n").splitlines()), tail
    assert not (wd / "runs" / "demo" / "final-hisf-demo-s1" / "worker.pid").exists()
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    final = [r for r in runs if r.data.tags.get("hisf.stage") == "final" and "hisf.trial_id" in r.data.tags]
    search = [r for r in runs if r.data.tags.get("hisf.stage") == "search" and "hisf.trial_id" in r.data.tags]
    assert len(search) == 4
    assert sorted((r.data.tags["hisf.row"], r.data.tags["hisf.seed"]) for r in final) == sorted(
        (row, str(s)) for row in ("CLIP", "CoOp", "MaPLe", "HISF", "HiCroPL") for s in (1, 2, 3))
    # Every trained run ended on a finite, positive loss (cross-entropy of a 6-class task); the orchestrator's own
    # time per run (MLflow, Optuna, files: everything but training) is well under a minute even on a busy machine.
    for r in final + search:
        if r.data.tags["hisf.row"] != "CLIP":
            assert 0 < r.data.metrics["train/loss"] < 100 and math.isfinite(r.data.metrics["train/loss_cls"]), r.data.tags
        assert 0 <= r.data.metrics["orchestration_seconds"] < 60, r.data.metrics
        assert 0 < r.data.metrics["engine_seconds"] < 480, r.data.metrics
    # Every run says where it ran: this process's torch, and what the engine actually ran (fp32, not compiled).
    import torch

    for r in final + search:
        assert r.data.tags["env.torch"] == torch.__version__ and r.data.tags["env.python"] == sys.version.split()[0]
        assert (r.data.tags["env.precision"], r.data.tags["env.compile"], r.data.tags["env.device"]) == ("fp32", "eager", "cpu")
    # The demo fuses (resources.fuse: auto): each row's three seeds trained as one group whose run links them, and
    # the search asked its trials in fused groups too; every member still has its own run.
    groups = {r.info.run_id: r for r in runs if r.data.tags.get("hisf.kind") == "group"}
    for r in final:
        assert r.data.tags["hisf.group"] in groups, r.data.tags["hisf.trial_id"]
    final_groups = {r.data.tags["hisf.group"] for r in final}
    assert len(final_groups) == 5
    for gid in final_groups:
        g = groups[gid]
        members = [r for r in final if r.data.tags["hisf.group"] == gid]
        assert len({r.data.tags["hisf.row"] for r in members}) == 1 and g.data.tags["hisf.group_size"] == "3"
        assert sorted(g.data.tags["hisf.group.members"].split(",")) == sorted(r.data.tags["hisf.trial_id"] for r in members)
        assert sorted(g.data.tags["hisf.group.runs"].split(",")) == sorted(r.info.run_id for r in members)
    assert all(r.data.tags["hisf.group"] in groups for r in search if "hisf.group" in r.data.tags)
    assert len({r.data.tags.get("hisf.group", r.info.run_id) for r in search}) < len(search)
    (study_name,) = {r.data.tags["optuna.study"] for r in search}
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{wd / 'optuna.db'}")
    assert len(study.trials) == 4
    for r in final:
        if r.data.tags["hisf.row"] == "HISF":
            assert float(r.data.params["method.lambda_le"]) == pytest.approx(study.best_params["method.lambda_le"])
        b, n = r.data.metrics["base_acc"], r.data.metrics["novel_acc"]
        assert r.data.metrics["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    # HiCroPL ran with the descriptions the demo data came with, and logged its own loss terms.
    descriptions = wd / "data" / "descriptions"
    assert (descriptions / "demo_prompt.json").is_file()
    hicropl = [r for r in final if r.data.tags["hisf.row"] == "HiCroPL"]
    for r in hicropl:
        assert r.data.params["method.name"] == "hicropl" and r.data.params["method.mapping"] == "learned"
        assert r.data.params["method.descriptions"] == str(descriptions.resolve())
        # Cosine distances to the frozen teachers: in (0, 2) (prompted features are never the teacher's own).
        assert 0 < r.data.metrics["train/loss_distill_text"] < 2 and 0 < r.data.metrics["train/loss_distill_image"] < 2
        assert 0 <= r.data.metrics["base_acc"] <= 100 and 0 <= r.data.metrics["novel_acc"] <= 100

    # The report (README's second command) has a HiCroPL row beside HISF's (and no paper rows: see below).
    rep = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", str(ROOT / "experiments" / "demo.yaml"),
                          "--out", str(tmp_path / "report")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "report" / "table_base2new.parquet")
    avg = df[df.section == "Average"].set_index(["row", "column"])
    mine = sorted(hicropl, key=lambda r: int(r.data.tags["hisf.seed"]))
    assert avg.loc[("HiCroPL", "base_acc")]["mean"] == pytest.approx(
        sum(r.data.metrics["base_acc"] for r in mine) / 3, abs=1e-9)
    assert avg.loc[("HiCroPL", "base_acc")]["status"] == "complete"
    md = (tmp_path / "report" / "table_base2new.md").read_text()
    assert "mixes runs from" not in md + rep.stdout  # one environment: no warning
    assert "| HISF |" in md and "| HiCroPL |" in md
    # A tiny random-weight CLIP on one demo dataset is not compared with the paper's 11-dataset averages.
    assert "(paper)" not in md and "No paper rows beside this table: its average is over 1 dataset(s)" in md
    # Per-class results: every final run's eval/ artifacts, and the demo section's worst classes in the report,
    # which reads them from the final launch's record (what each trial reported to the driver), not run by run.
    for r in final:
        assert {"eval/base.json", "eval/novel.json", "eval/val.json"} <= {
            a.path for a in client.list_artifacts(r.info.run_id, "eval")}
    from orchestrator.records import read_record

    (final_launch,) = {r.data.tags["mlflow.parentRunId"] for r in final}
    recorded, _ = read_record(client, client.get_run(final_launch))
    assert {r.info.run_id for r in recorded if r.classes and {"base", "novel"} <= set(r.classes)} == {
        r.info.run_id for r in final}
    assert "Worst classes (the 5 lowest per-class test accuracies" in md and "| HiCroPL | novel |" in md

    # The README's walk-through of using what was trained: predict from a trial folder, eval from a run id.
    folder = wd / "runs" / "demo" / "final-hisf-demo-s1"
    image = wd / "data" / "_raw" / "demo" / "images" / "red_circle" / "red_circle_0000.png"
    pred = subprocess.run([sys.executable, "-m", "orchestrator.cli", "predict", str(folder), str(image), "--dataset",
                           "demo", "--top-k", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert "top 3 of 6 classes (dataset demo)" in pred.stdout and re.search(r"^  3\. \w+ \w+ +\d+\.\d\d%$", pred.stdout, re.M)
    hisf1 = next(r for r in final if r.data.tags["hisf.row"] == "HISF" and r.data.tags["hisf.seed"] == "1")
    ev = subprocess.run([sys.executable, "-m", "orchestrator.cli", "eval", hisf1.info.run_id, "--dataset", "demo",
                         "--classes", "novel"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"top-1 {hisf1.data.metrics['novel_acc']:.2f}%" in ev.stdout and "MLflow run " in ev.stdout
