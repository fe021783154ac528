"""DDP trials under faults: a killed Ray Train worker (FailureConfig) and a killed Tune trial both resume from
Ray Train's checkpoint with the metrics of an unkilled run; a ConfigError in a trial fails it at once, without
retries (a DDP trial's before its workers start)."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hisf.config import replace_path
from hisf.engine import run_trial
from orchestrator.spec import load_spec
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import mlflow_children, run_cli, sweep_and_kill, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _ddp_spec(path: Path, demo_root: Path, name: str, epochs: int, workers: int = 2, **train) -> Path:
    spec_path = write_spec(path, demo_root, name=name, epochs=epochs, shots=4, max_concurrent=1,
                           rows=[{"name": "HISF", "method": {"name": "hisf", "depth": 2}}])
    raw = yaml.safe_load(spec_path.read_text())
    raw["resources"].update(workers_per_trial=workers, cpus_per_trial=1, max_failures=2)
    raw["base"]["train"].update(train)
    spec_path.write_text(yaml.safe_dump(raw))
    return spec_path


def _train_checkpointed(workdir: Path) -> bool:
    for snap in (workdir / "hisf-bench" / "ray_results").glob("*-ddp-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


def _kill_mid_run(tmp_path: Path, demo_root: Path, name: str, pid_file: str, epochs: int = 4):
    """Run a 2-worker sweep, SIGKILL the process named in `pid_file` once Ray Train has registered a checkpoint,
    check the trial resumed from it and ends with an unkilled run's metrics; return its MLflow run."""
    spec_path = _ddp_spec(tmp_path / "k.yaml", demo_root, name, epochs)
    (trial,) = expand_sweep(load_spec(spec_path), tmp_path / "hisf-bench")
    out_dir = Path(trial.config.output_dir)
    state = out_dir / "checkpoint" / "state.pt"
    # The controller registers a reported checkpoint a moment after the report: wait for its snapshot.
    code, out, killed_at = sweep_and_kill(
        spec_path, tmp_path, lambda: _train_checkpointed(tmp_path) and (out_dir / pid_file).is_file(),
        "Ray Train's first registered checkpoint", out_dir / pid_file, state, ready_timeout=150, run_timeout=150)
    assert code == 0, out[-4000:]
    assert 1 <= killed_at < epochs

    uri = f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}"
    (run,) = mlflow_children(uri, name)  # the retry continued the same run
    assert run.data.tags["hisf.status"] == "finished", run.data.tags
    client = MlflowClient(uri)
    # The restart resumed from Ray Train's checkpoint (reported each epoch, so at most one epoch behind).
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")]
    assert len(resumed) == 1 and 1 <= resumed[0] <= killed_at, (resumed, killed_at)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert sorted(set(steps)) == list(range(epochs))
    # Resumed, not restarted: the epochs Ray Train's checkpoint held were trained (and logged) once.
    assert all(steps.count(e) == 1 for e in range(int(resumed[0]))), steps

    # The same metrics as an unkilled run: 1 process x 2B equals 2 ranks x B (test_ddp.py).
    cfg = replace_path(replace_path(trial.config, "train.batch_size", 2 * trial.config.train.batch_size),
                       "output_dir", str(tmp_path / "unkilled"))
    ref = run_trial(cfg)
    assert run.data.metrics["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-4)
    for k in ("base_acc", "novel_acc", "hm", "val_acc"):
        assert run.data.metrics[k] == pytest.approx(ref[k], abs=1e-6), k
    return run


def test_killed_ddp_worker_retries_from_train_checkpoint(tmp_path, demo_root):
    # Rank 1 dies: Ray Train's FailureConfig restarts the worker group inside the same Tune trial.
    run = _kill_mid_run(tmp_path, demo_root, "ddpworker", "worker.rank1.pid")
    assert run.data.tags["hisf.attempts"] == "1" and run.data.tags["hisf.train_attempts"] == "2", run.data.tags


def test_killed_ddp_trial_retries_from_train_checkpoint(tmp_path, demo_root):
    # The Tune trial's process dies (its TorchTrainer controller with it): Tune retries the trial, whose new
    # TorchTrainer (same run name) restores Ray Train's checkpoint.
    run = _kill_mid_run(tmp_path, demo_root, "ddptrial", "worker.pid")
    assert run.data.tags["hisf.attempts"] == "2" and run.data.tags["hisf.train_attempts"] == "2", run.data.tags


@pytest.mark.parametrize("workers", [1, 2])
def test_config_error_in_trial_fails_at_once(tmp_path, demo_root, workers):
    # A valid spec whose batch is bigger than the few-shot training set: only the engine can tell.
    spec_path = _ddp_spec(tmp_path / "c.yaml", demo_root, "cfgerr", epochs=2, workers=workers, batch_size=512)
    out = run_cli(["sweep", spec_path], cwd=tmp_path, timeout=200)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "failed: bad trial config (not retried): train.batch_size: 512 per rank" in out.stdout, text[-3000:]
    (run,) = mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "cfgerr")
    tags = run.data.tags
    assert tags["hisf.status"] == "failed" and tags["hisf.attempts"] == "1", tags  # max_failures=2, no Tune retry
    assert tags["hisf.error"].startswith(f"bad trial config (not retried): train.batch_size: 512 per rank x {workers}")
    if workers > 1:
        # Checked in the Tune trial before any worker group starts (no FailureConfig restart either).
        assert "hisf.train_attempts" not in tags, tags
    assert run.info.status == "FAILED"
    # As fast as a one-device trial: recorded failed within seconds of the run's start (Ray Train's controller
    # waiting on a failed worker group took ~75 s idle, 200 s under load); 30 s is generous, not unbounded.
    assert run.info.end_time - run.info.start_time < 30_000, (run.info.start_time, run.info.end_time)
