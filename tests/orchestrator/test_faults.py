"""Fault tolerance with real processes: a killed trial worker retries from its checkpoint; a killed driver resumes."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hisf.config import replace_path
from hisf.engine import run_trial
from orchestrator.spec import load_spec
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import (
    checkpoint_epoch,
    cli_env,
    descendants,
    finished_runs,
    kill_pids,
    mlflow_children,
    run_cli,
    sweep_and_kill,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_killed_worker_retries_from_checkpoint_with_same_metrics(tmp_path, demo_root):
    epochs = 30
    spec_path = write_spec(tmp_path / "k.yaml", demo_root, name="kill", epochs=epochs, shots=8, max_concurrent=1,
                           rows=[{"name": "HISF", "method": {"name": "hisf", "depth": 2}}])
    (trial,) = expand_sweep(load_spec(spec_path), tmp_path / "hisf-bench")
    state = Path(trial.config.output_dir) / "checkpoint" / "state.pt"
    pid_file = Path(trial.config.output_dir) / "worker.pid"
    code, out, killed_at = sweep_and_kill(
        spec_path, tmp_path, lambda: state.is_file() and pid_file.is_file() and checkpoint_epoch(state) >= 2,
        "the trial's second epoch checkpoint", pid_file, state, ready_timeout=180, run_timeout=240)
    assert code == 0, out[-4000:]
    assert 2 <= killed_at < epochs
    # The console's progress line counts the retry (Tune's on_trial_recover).
    progress = [ln for ln in out.splitlines() if ln.startswith("[sweep] ") and " finished, " in ln]
    assert progress and progress[-1].startswith("[sweep] 1/1 finished, 0 running, 0 failed, 0 pruned, 1 retry · "), out[-3000:]

    uri = f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}"
    (run,) = mlflow_children(uri, "kill")  # the retry continued the same run
    assert run.data.tags["hisf.status"] == "finished" and run.data.tags["hisf.attempts"] == "2"
    client = MlflowClient(uri)
    # Tune restored a checkpoint (it may lag the engine's own by an epoch; the engine resumes from the newer).
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_epoch")
    assert len(resumed) == 1 and 1 <= resumed[0].value < epochs
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(set(steps)) == list(range(epochs))
    # Resumed, not restarted: the epochs before the kill were not trained (nor logged) a second time.
    assert all(steps.count(e) == 1 for e in range(killed_at - 1))

    # An unkilled run of the same trial config ends with the same metrics.
    cfg = replace_path(trial.config, "output_dir", str(tmp_path / "unkilled"))
    ref = run_trial(cfg)
    for k in ("base_acc", "novel_acc", "hm", "val_acc", "train/loss", "train/loss_le", "train/loss_sa"):
        assert run.data.metrics[k] == pytest.approx(ref[k], abs=1e-9), k


def test_killed_fused_group_retries_every_member_from_the_group_checkpoint(tmp_path, demo_root):
    """Two seeds fused in one Tune trial (fuse: 2): its worker killed mid-run, Tune retries the group from its
    checkpoint, and each member ends as its own run did alone, unkilled and unfused."""
    epochs = 24
    spec_path = write_spec(tmp_path / "g.yaml", demo_root, name="fkill", epochs=epochs, shots=8, max_concurrent=1,
                           seeds=(1, 2), fuse=2, rows=[{"name": "HISF", "method": {"name": "hisf", "depth": 2}}])
    trials = expand_sweep(load_spec(spec_path), tmp_path / "hisf-bench")
    assert len(trials) == 2
    states = [Path(t.config.output_dir) / "checkpoint" / "state.pt" for t in trials]
    pid_file = Path(trials[0].config.output_dir) / "worker.pid"
    code, out, killed_at = sweep_and_kill(
        spec_path, tmp_path, lambda: pid_file.is_file() and all(s.is_file() and checkpoint_epoch(s) >= 2
                                                                for s in states),
        "both members' second epoch checkpoints", pid_file, states[0], ready_timeout=180, run_timeout=240)
    assert code == 0, out[-4000:]
    assert 2 <= killed_at < epochs
    assert "running 2 in 1 fused group(s)" in out, out[-3000:]

    uri = f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}"
    runs = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "fkill")}
    assert sorted(runs) == sorted(t.trial_id for t in trials)  # one run per member, continued by the retry
    client = MlflowClient(uri)
    for t in trials:
        run = runs[t.trial_id]
        assert run.data.tags["hisf.status"] == "finished" and run.data.tags["hisf.attempts"] == "2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(set(steps)) == list(range(epochs))
        assert all(steps.count(e) == 1 for e in range(killed_at - 1))  # resumed, not restarted
        ref = run_trial(replace_path(t.config, "output_dir", str(tmp_path / "alone" / t.trial_id)))
        for k in ("base_acc", "novel_acc", "hm", "val_acc", "train/loss", "train/loss_le", "train/loss_sa"):
            assert run.data.metrics[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (t.trial_id, k)  # fused == alone


def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path, demo_root):
    spec_path = write_spec(tmp_path / "d.yaml", demo_root, name="driver", epochs=3, seeds=(1, 2), max_concurrent=1,
                           rows=[{"name": "CoOp", "method": {"name": "coop"}},
                                 {"name": "MaPLe", "method": {"name": "maple", "depth": 2}}])
    uri = f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}"

    db = tmp_path / "hisf-bench" / "mlflow.db"

    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path)], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    tree: list[int] = []
    try:
        wait_for(lambda: finished_runs(db) >= 1, 200, 0.1, "a first finished trial")
        tree = descendants(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            tree += descendants(driver.pid)
            driver.kill()
        # The local Ray the driver started (raylet, GCS, workers): stop them by pid.
        kill_pids(tree)
    before = {r.data.tags["hisf.trial_id"]: r for r in mlflow_children(uri, "driver")
              if r.data.tags.get("hisf.status") == "finished"}
    assert 1 <= len(before) < 4

    out = run_cli(["sweep", spec_path, "--resume"], cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{len(before)} already finished, running {4 - len(before)}" in out.stdout
    runs = mlflow_children(uri, "driver")
    ids = [r.data.tags["hisf.trial_id"] for r in runs]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 4  # no duplicated run
    assert all(r.data.tags["hisf.status"] == "finished" for r in runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # the resumed stage continued the same parent run
    for r in runs:
        tid = r.data.tags["hisf.trial_id"]
        if tid in before:  # finished trials were not rerun: same run, untouched
            assert r.info.run_id == before[tid].info.run_id
            assert r.info.end_time == before[tid].info.end_time
            assert r.data.tags["hisf.attempts"] == "1"
