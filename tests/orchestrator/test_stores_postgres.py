"""Cluster-grade stores, really run: PostgreSQL 15 behind an `mlflow server` and Optuna's RDB storage; a search
+ final sweep on them, and the same sweep while the `mlflow server` goes away for 20 s and PostgreSQL restarts."""

import re
import subprocess
import sys
import threading
import time
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import (
    cli_env,
    mlflow_children,
    postgres_stores,
    run_cli,
    search_spec,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STATES = {"finished": "COMPLETE", "pruned": "PRUNED"}
CURVES = ("val_acc", "train/loss", "lr")


@pytest.fixture(scope="module")
def pg_stores():
    with postgres_stores(workers=2) as st:
        yield st


def flags(st) -> list[str]:
    return ["--tracking-uri", st.tracking_uri, "--optuna-storage", st.optuna_storage]


def rows() -> list[dict]:
    return [{"name": "CoOp", "method": {"name": "coop"}},
            {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}]


def metric_rows(st, run_ids) -> dict[tuple[str, str], int]:
    """(run id, key) -> rows in PostgreSQL's metrics table: what the server stored, duplicates included."""
    with st.postgres.admin("mlflow") as conn:
        got = conn.execute("select run_uuid, key, count(*) from metrics where run_uuid = any(%s) group by 1, 2",
                           (list(run_ids),)).fetchall()
    return {(run, key): n for run, key, n in got}


def check_records(st, experiment: str, n_search: int, final_ids: list[str], epochs: int) -> dict:
    """Counts, not "it ran": one run per trial, every epoch's metrics once, the study's trials and states."""
    uri = st.tracking_uri
    client = MlflowClient(uri)
    runs = mlflow_children(uri, experiment)
    search = [r for r in runs if r.data.tags["hisf.stage"] == "search"]
    final = [r for r in runs if r.data.tags["hisf.stage"] == "final"]
    assert sorted(r.data.tags["hisf.trial_id"] for r in final) == sorted(final_ids)
    assert len(search) == n_search and len({r.data.tags["hisf.trial_id"] for r in search}) == n_search
    rows_of = metric_rows(st, [r.info.run_id for r in runs])
    for r in final + search:
        status = r.data.tags["hisf.status"]
        assert status in (("finished",) if r in final else ("finished", "pruned")), (r.data.tags, status)
        for key in CURVES:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            # every epoch once (a pruned trial stops early), and PostgreSQL holds exactly those rows
            expect = list(range(epochs)) if status == "finished" else list(range(len(steps)))
            assert sorted(steps) == expect and steps, (r.data.tags["hisf.trial_id"], key, steps)
            assert rows_of[(r.info.run_id, key)] == len(steps)
        if status == "finished":
            assert {"val_acc", "engine_seconds", "orchestration_seconds"} <= set(r.data.metrics)
    for r in final:
        assert {"base_acc", "novel_acc", "hm"} <= set(r.data.metrics)
        assert {"prompts.pt", "config.yaml", "metrics.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        # served from the folder the server owns, not written by the trials into their own
        assert (st.root / "mlflow-artifacts" / r.info.experiment_id / r.info.run_id / "artifacts" / "metrics.json").is_file()
    studies = {r.data.tags["optuna.study"] for r in search}
    assert len(studies) == 1
    study = optuna.load_study(study_name=studies.pop(), storage=st.optuna_storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n_search
    assert Counter(t.state.name for t in trials) == Counter(STATES[r.data.tags["hisf.status"]] for r in search)
    by_run = {r.info.run_id: r for r in search}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == set(by_run)
    for t in trials:
        # the study heard every validation epoch the run logged, once
        run = by_run[t.user_attrs["mlflow_run_id"]]
        assert int(run.data.tags["optuna.trial_number"]) == t.number
        assert sorted(t.intermediate_values) == sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    with st.postgres.admin("optuna") as conn:
        n = conn.execute("select count(*) from trials join studies using (study_id) where study_name = %s",
                         (study.study_name,)).fetchone()[0]
    assert n == n_search
    return {"search": search, "final": final}


def test_search_and_final_on_postgres_stores(tmp_path, demo_root, pg_stores):
    epochs = 2
    spec = write_spec(tmp_path / "pg.yaml", demo_root, name="pg", rows=rows(), search=search_spec(4),
                      seeds=(1,), epochs=epochs, max_concurrent=2)
    out = run_cli(["run", spec, *flags(pg_stores), "--num-cpus", "2"], cwd=tmp_path, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_records(pg_stores, "pg", 4, [f"final-{r}-demo-s1" for r in ("coop", "hisf")], epochs)
    # nothing fell back to a local SQLite store
    assert not list((tmp_path / "hisf-bench").glob("*.db"))
    with pg_stores.postgres.admin("mlflow") as conn:
        assert conn.execute("select count(*) from runs join experiments using (experiment_id) where experiments.name = 'pg'"
                            ).fetchone()[0] == 4 + 2 + 2  # trials + the two stages' parent runs
    status = run_cli(["status", spec, *flags(pg_stores)], cwd=tmp_path, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert re.search(r"^final +run \w+ FINISHED: 2 finished$", status.stdout, re.M), status.stdout
    assert re.search(r"study pg:HISF:demo:\w+: \{.*'complete': [1-4]", status.stdout), status.stdout


def test_a_store_blink_loses_nothing(tmp_path, demo_root, pg_stores):
    """PostgreSQL stops (under the `mlflow server` and the trials' Optuna connections) until a client has felt it,
    then the `mlflow server` is away for 20 s, while the search stage runs: trials wait (bounded, logged retries)
    or fail and are retried, and `--resume` completes it: no duplicate run, no missing metric, every Optuna
    trial finished once. (The final stage meets the same stores in the test above.)"""
    epochs, n_search = 3, 4
    spec = write_spec(tmp_path / "blink.yaml", demo_root, name="blink", rows=rows(), search=search_spec(n_search),
                      seeds=(1,), epochs=epochs, max_concurrent=2)
    st = pg_stores
    logs = tmp_path / "hisf-bench" / "logs"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "search", str(spec), *flags(st), "--num-cpus", "2"],
                              cwd=tmp_path, env={**cli_env(), "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True).start()

    def retries() -> int:
        """Retries logged so far: the trials' (Ray's output, in the stage logs) and the driver's own."""
        text = "".join(lines) + "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        return text.count("store unavailable")

    try:
        def finished_search():
            return [r for r in mlflow_children(st.tracking_uri, "blink", "search")
                    if r.data.tags.get("hisf.status") in ("finished", "pruned")]

        before = wait_for(finished_search, 300, 0.5, "a finished search trial")
        kept = {r.info.run_id: r.data.tags["hisf.trial_id"] for r in before}
        seen = retries()
        st.postgres.stop()
        # down until a trial's write has met the outage and is retrying (what the test is about), 5 s at least
        time.sleep(5)
        wait_for(lambda: retries() > seen, 120, 0.5, "a retried write while PostgreSQL is down")
        st.postgres.start()
        seen = retries()
        st.mlflow.stop()
        time.sleep(20)
        wait_for(lambda: retries() > seen, 120, 0.5, "a retried write while the mlflow server is down")
        st.mlflow.start()
        driver.wait(420)
    finally:
        if driver.poll() is None:
            driver.kill()
    # Whatever the blinked run's end (it may have failed trials), the resumed one completes the stage.
    resumed = run_cli(["search", spec, *flags(st), "--num-cpus", "2", "--resume"], cwd=tmp_path, timeout=420)
    assert resumed.returncode == 0, "".join(lines)[-2000:] + resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = check_records(st, "blink", n_search, [], epochs)
    # trials finished before the blink keep their runs
    assert kept.items() <= {r.info.run_id: r.data.tags["hisf.trial_id"] for r in got["search"]}.items()
