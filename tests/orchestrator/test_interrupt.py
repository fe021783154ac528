"""Ctrl-C during a real `run`: reported as an interruption with what finished, what was cut short and what never
started, the runs marked KILLED (never left RUNNING, never called failed), and the printed command resumes it."""

import os
import shlex
import signal
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import (
    cli_env,
    descendants,
    finished_runs,
    kill_pids,
    mlflow_children,
    run_cli,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_ctrl_c_during_the_search_of_a_run_is_an_interruption_that_the_printed_command_resumes(tmp_path, demo_root):
    spec = write_spec(tmp_path / "i.yaml", demo_root, name="intr", epochs=30, max_concurrent=1, rows=[
        {"name": "CLIP", "method": {"name": "zeroshot"}},
        {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}],
        search={"n_trials": 3, "sampler": "random", "seed": 1, "pruner": "none",
                "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}})
    wd = tmp_path / "hisf-bench"
    db = wd / "mlflow.db"
    second = wd / "runs" / "intr" / "search-hisf-demo-t1" / "checkpoint" / "state.pt"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec)], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        # The first search trial finished and the second is training (its first epoch checkpoint is written).
        wait_for(lambda: finished_runs(db) >= 1 and second.is_file(), 300, 0.05,
                 "a finished search trial and a second one training")
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the driver's whole group
        out, _ = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            leftover = descendants(driver.pid)
            driver.kill()
            kill_pids(leftover)
    assert driver.returncode == 130, out[-4000:]
    assert "[search] interrupted after " in out, out[-4000:]
    assert ": 1 finished, 0 failed, 1 cut short, 1 never started (MLflow parent run " in out, out[-4000:]
    assert "[run] not started: final" in out
    resume = f"hisf-bench run {spec} --resume"
    assert f"resume with: {resume}\n" in out, out[-4000:]
    for wrong in ("failed: see its MLflow run", "hisf-bench search", "Traceback", "[search] done"):
        assert wrong not in out, (wrong, out[-4000:])

    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("intr")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("hisf.kind") == "stage"]
    assert parent.info.status == "KILLED" and parent.data.tags["hisf.error"] == "interrupted (Ctrl-C)"
    runs = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "intr")}
    assert sorted(runs) == ["search-hisf-demo-t0", "search-hisf-demo-t1"]
    assert runs["search-hisf-demo-t0"].info.status == "FINISHED"
    cut = runs["search-hisf-demo-t1"]
    assert cut.info.status == "KILLED" and cut.data.tags["hisf.status"] == "interrupted"

    # The printed command, as printed, finishes the search (the cut-short trial continued, not restarted) and
    # then the final stage.
    args = shlex.split(resume)
    assert args[:2] == ["hisf-bench", "run"]
    again = run_cli(args[1:], cwd=tmp_path, timeout=500)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    storage = f"sqlite:///{wd / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    search = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "intr", "search")}
    assert search["search-hisf-demo-t1"].info.run_id == cut.info.run_id  # the same run, continued
    assert search["search-hisf-demo-t1"].data.tags["hisf.attempts"] == "2"
    assert search["search-hisf-demo-t0"].data.tags["hisf.attempts"] == "1"  # finished: not rerun
    final = mlflow_children(uri, "intr", "final")
    assert sorted(r.data.tags["hisf.trial_id"] for r in final) == ["final-clip-demo-s1", "final-hisf-demo-s1"]
    assert all(r.info.status == "FINISHED" for r in final)
