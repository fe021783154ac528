"""`hisf-bench stores serve`: the flags it prints work, Ctrl-C stops both servers, a second start reuses the
cluster (here with credentials), and a non-loopback interface without credentials is refused."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import cli_env, descendants, free_port, run_cli, stores_root, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
PASSWORD = "correct horse battery staple"


class Served:
    """`hisf-bench stores serve ...` in its own session, its output collected line by line."""

    def __init__(self, root: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "stores", "serve", "--root", str(root), "--workers", "1", *args],
            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def ready(self) -> dict[str, str]:
        wait_for(lambda: "Ctrl-C stops both." in self.out or self.proc.poll() is not None, 240, 0.2, "stores serve")
        assert self.proc.poll() is None, self.out
        m = re.search(r"--tracking-uri (\S+) --optuna-storage (\S+)", self.out)
        assert m, self.out
        self.children = descendants(self.proc.pid)
        assert len(self.children) >= 3, self.children  # postgres and its workers, the mlflow server and its
        return {"tracking_uri": m.group(1), "optuna_storage": m.group(2)}

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(120)
        wait_for(lambda: not [p for p in self.children if alive(p)], 30, 0.2, "every server process to exit")
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.children if hasattr(self, "children") else []:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_serve_then_reuse_with_credentials(tmp_path, monkeypatch):
    root = stores_root()
    port, pg_port = free_port(), free_port()
    try:
        first = Served(root / "stores", "--port", str(port), "--pg-port", str(pg_port))
        try:
            got = first.ready()
            assert "(new)" in first.out
            assert got == {"tracking_uri": f"http://127.0.0.1:{port}",
                           "optuna_storage": f"postgresql+psycopg://hisf@127.0.0.1:{pg_port}/optuna"}
            # a client writes a run and an Optuna study through exactly the printed flags
            client = MlflowClient(got["tracking_uri"])
            exp = client.create_experiment("served")
            run = client.create_run(exp)
            client.log_metric(run.info.run_id, "acc", 0.5, step=0)
            (tmp_path / "note.txt").write_text("artifact")
            client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
            client.set_terminated(run.info.run_id)
            study = optuna.create_study(study_name="served", storage=got["optuna_storage"])
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
            assert (root / "stores" / "mlflow-artifacts" / exp / run.info.run_id / "artifacts" / "note.txt").is_file()
            assert first.stop(signal.SIGINT) == 0, first.out  # Ctrl-C
        finally:
            first.kill()
        assert "stopped" in first.out
        assert not (root / "stores" / "postgres" / "postmaster.pid").exists()  # PostgreSQL shut down cleanly

        # Again on the same root, with credentials: same ports (kept in stores.json), same data.
        pw = tmp_path / "password"
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
        second = Served(root / "stores", "--password-file", str(pw))
        try:
            assert second.ready() == got
            assert "(reused)" in second.out
            with pytest.raises(Exception, match="401"):
                MlflowClient(got["tracking_uri"]).get_run(run.info.run_id)
            monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host="127.0.0.1", port=pg_port, user="hisf", dbname="optuna", connect_timeout=10)
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hisf")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
            monkeypatch.setenv("PGPASSWORD", PASSWORD)
            client = MlflowClient(got["tracking_uri"])
            assert client.get_run(run.info.run_id).data.metrics == {"acc": 0.5}
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
            study = optuna.load_study(study_name="served", storage=got["optuna_storage"])
            assert len(study.trials) == 2
            assert second.stop(signal.SIGTERM) == 0, second.out
        finally:
            second.kill()
        # the password is never printed, logged or written beside the stores
        assert PASSWORD not in first.out + second.out
        for f in (root / "stores").rglob("*"):
            if f.is_file() and "postgres" not in f.relative_to(root / "stores").parts[:1]:
                assert PASSWORD.encode() not in f.read_bytes(), f
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_serve_refuses_the_network_without_credentials(tmp_path):
    out = run_cli(["stores", "serve", "--root", tmp_path / "st", "--host", "0.0.0.0"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--host 0.0.0.0 is not a loopback address" in out.stderr and "--password-file" in out.stderr
    assert not (tmp_path / "st" / "postgres").exists()  # refused before anything started
    short = tmp_path / "short"
    short.write_text("tooshort")
    out = run_cli(["stores", "serve", "--root", tmp_path / "st", "--password-file", short], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "at least 12 characters" in out.stderr, out.stdout + out.stderr
