"""Stores and the workdir are checked in seconds before anything runs (one message naming the flag and the fix),
and a stage that ends by an exception never leaves its MLflow parent run RUNNING."""

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.stage_end import closing_stage
from orchestrator.tracking import Tracker
from tests.orchestrator.helpers import free_port, run_cli, write_spec

pytestmark = pytest.mark.timeout(300)
SEARCH = {"n_trials": 2, "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}}


def _spec(tmp_path, demo_root):
    return write_spec(tmp_path / "s.yaml", demo_root, name="stores", rows=[
        {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}], search=SEARCH)


@contextlib.contextmanager
def read_only_dir(tmp_path: Path):
    """A folder no process here can write into: a read-only tmpfs for root (who ignores permissions), a folder
    without write permission for anyone else. Checked by trying to write."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
        mounted = done.returncode == 0
        assert mounted, f"as root a read-only folder needs `mount -t tmpfs -o ro`: {done.stderr.decode()}"
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def _refused(args, cwd, *needles):
    started = time.monotonic()
    out = run_cli(args, cwd=cwd, timeout=120)
    took = time.monotonic() - started
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for n in needles:
        assert n in out.stderr, (n, out.stderr[-3000:])
    return out, took


def test_a_dead_tracking_server_is_named_in_seconds_not_after_minutes_of_retries(tmp_path, demo_root):
    spec = _spec(tmp_path, demo_root)
    dead = f"http://127.0.0.1:{free_port()}"
    for command in (["run", spec], ["status", spec], ["run", spec, "--dry-run"]):
        out, took = _refused([*command, "--tracking-uri", dead], tmp_path,
                             f"--tracking-uri {dead}: no MLflow server answers there within 5 s", "mlflow server --host 127.0.0.1")
        # MLflow's own client retries for about 5 minutes: the check answers in seconds (process start included).
        assert took < 90, (command, took)
    assert not (tmp_path / "hisf-bench" / "mlflow.db").exists()


def test_bad_optuna_urls_and_a_missing_driver_name_the_flag(tmp_path, demo_root):
    spec = _spec(tmp_path, demo_root)
    _refused(["run", spec, "--optuna-storage", "nosuchdb://x/y"], tmp_path,
             "--optuna-storage nosuchdb://x/y: SQLAlchemy knows no database 'nosuchdb'")
    _refused(["search", spec, "--optuna-storage", "not a url"], tmp_path, "--optuna-storage not a url: not a database URL")
    # mysql:// means the MySQLdb driver (mysqlclient), which this environment does not have.
    _refused(["run", spec, "--optuna-storage", "mysql://user:secret@127.0.0.1:1/optuna"], tmp_path,
             "--optuna-storage mysql://***@127.0.0.1:1/optuna: the database driver 'MySQLdb' is not installed; "
             "`pip install mysqlclient`")
    # A server database that does not answer: named with the reason, the password never printed.
    out, _ = _refused(["run", spec, "--tracking-uri", f"postgresql://user:secret@127.0.0.1:{free_port()}/mlflow"],
                      tmp_path, "--tracking-uri postgresql://***@127.0.0.1:", "cannot connect within 5 s")
    assert "secret" not in out.stderr
    # A sweep-only command does not read studies: a bad Optuna URL is no concern of `sweep`'s spec.
    sweep = write_spec(tmp_path / "w.yaml", demo_root, name="nosearch", rows=[{"name": "CLIP", "method": {"name": "zeroshot"}}])
    ok = run_cli(["sweep", sweep, "--optuna-storage", "nosuchdb://x/y", "--dry-run"], cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]


def test_a_read_only_workdir_is_refused_before_anything_is_written(tmp_path, demo_root):
    spec = _spec(tmp_path, demo_root)
    with read_only_dir(tmp_path) as ro:
        wd = ro / "hisf-bench"
        _refused(["run", spec, "--workdir", wd], tmp_path, f"--workdir {wd}: cannot write there: Read-only file system (EROFS)"
                 if os.geteuid() == 0 else f"--workdir {wd}: cannot write there: Permission denied (EACCES)")
        _refused(["run", spec, "--workdir", wd, "--dry-run"], tmp_path, f"--workdir {wd}: {ro} is not writable")


def test_a_stage_ending_by_an_exception_closes_its_parent_run_failed_with_the_reason(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "guard")
    parent = tracker.stage_run("sweep", "hash", resume=False)
    with pytest.raises(OSError):
        with closing_stage("sweep", tracker, parent, time.perf_counter()):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    run = MlflowClient(uri).get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["hisf.error"].startswith("OSError: [Errno 28] No space left on device")
