"""Real multi-process infrastructure: a two-node Ray cluster on this machine, and a real `mlflow server`."""

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.orchestrator.helpers import (
    ROOT,
    cli_env,
    free_port,
    mlflow_children,
    mlflow_server_at,
    run_cli,
    stop_group,
    wait_for,
    write_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BIN = Path(sys.executable).parent


def node_args(num_cpus: int = 1) -> list[str]:
    """Loopback only, and every port a free one, so tests beside other engineers' clusters do not collide."""
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--block", "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


def token_auth(monkeypatch) -> Path:
    """Ray 2.60 `ray start` clusters use token authentication: a test-only token every client here reads."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    return tmp


@pytest.fixture()
def two_node_cluster(monkeypatch):
    """`ray start --head` plus `ray start --address`, one CPU each, token auth with a test-only token."""
    tmp = token_auth(monkeypatch)
    port = free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard", "false",
             "--temp-dir", str(tmp / "t"), *node_args()],
            stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: "Ray runtime started" in (tmp / "head.log").read_text(), 90, 0.2, "the head node")
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", *node_args()],
            stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: "Ray runtime started" in (tmp / "worker.log").read_text(), 90, 0.2, "the second node")
        yield f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            stop_group(p, marker=str(tmp))


def test_sweep_spreads_over_two_nodes(tmp_path, demo_root, two_node_cluster):
    spec = write_spec(tmp_path / "c.yaml", demo_root, name="cluster", epochs=2, seeds=(1, 2), max_concurrent=2,
                      rows=[{"name": "CoOp", "method": {"name": "coop"}},
                            {"name": "MaPLe", "method": {"name": "maple", "depth": 2}}])
    # Two nodes with the default stores (SQLite files, a local workdir and data root): refused before any
    # trial, naming the flags; workers on another machine would write into their own node's files.
    out = run_cli(["sweep", spec, "--address", two_node_cluster], cwd=tmp_path, timeout=240)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    for flag in ("the Ray cluster has 2 nodes", "--tracking-uri http://HOST:5000", "--workdir /shared/",
                 "data.root", "--shared-storage"):
        assert flag in out.stderr, (flag, out.stderr[-3000:])
    assert mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "cluster") == []
    assert not (tmp_path / "hisf-bench" / "runs").exists()
    # Both nodes are this machine, so every path is in fact seen by both: declared with --shared-storage.
    out = run_cli(["sweep", spec, "--address", two_node_cluster, "--shared-storage"], cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The console: the note on --shared-storage once, and none of Ray's worker lines (not even after the summary).
    console = out.stdout + out.stderr
    assert console.count("as --shared-storage says, every node sees") == 1, console[-3000:]
    for chatter in ("Checkpoint successfully created", "repeated", "(tune_trainable pid="):
        assert chatter not in console, (chatter, console[-3000:])
    runs = mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "cluster")
    assert len(runs) == 4 and all(r.data.tags["hisf.status"] == "finished" for r in runs)
    nodes = {r.data.tags["hisf.node"] for r in runs}
    assert len(nodes) == 2, nodes  # one CPU per node, two trials at once: both nodes ran trials
    assert all(0 <= r.data.metrics["hm"] <= 100 for r in runs)


@pytest.fixture()
def mlflow_server(tmp_path):
    with mlflow_server_at(tmp_path / "server", workers=2) as url:  # two workers: concurrent trial writers
        yield url


def test_tracking_to_a_real_mlflow_server_loses_nothing(tmp_path, demo_root, mlflow_server):
    epochs = 3
    spec = write_spec(tmp_path / "m.yaml", demo_root, name="server", epochs=epochs, seeds=(1, 2, 3),
                      max_concurrent=2, rows=[{"name": "CoOp", "method": {"name": "coop"}},
                                              {"name": "HISF", "method": {"name": "hisf", "depth": 2}}])
    out = run_cli(["sweep", spec, "--tracking-uri", mlflow_server, "--num-cpus", "2"], cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = mlflow_children(mlflow_server, "server")
    assert sorted(r.data.tags["hisf.trial_id"] for r in runs) == sorted(
        f"sweep-{row}-demo-s{s}" for row in ("coop", "hisf") for s in (1, 2, 3))
    client = MlflowClient(mlflow_server)
    for r in runs:
        assert r.data.tags["hisf.status"] == "finished"
        for key in ("val_acc", "train/loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(epochs)), key
        assert {"base_acc", "novel_acc", "hm", "engine_seconds"} <= set(r.data.metrics)
        assert {"prompts.pt", "config.yaml", "metrics.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        # the server stored what the trial wrote: metrics.json's final hm equals the logged metric
        path = client.download_artifacts(r.info.run_id, "metrics.json", str(tmp_path / r.info.run_id))
        import json

        assert json.loads(Path(path).read_text())["final"]["hm"] == pytest.approx(r.data.metrics["hm"])
    # several trials wrote at once: some runs overlap in time
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


@pytest.fixture()
def head_with_dashboard(monkeypatch):
    """A one-node cluster as users start it for `ray job submit`: `ray start --head` with its dashboard (the job
    server) on 127.0.0.1 and a free port; two CPUs so the demo's two concurrent trials fit."""
    tmp = token_auth(monkeypatch)
    dashboard = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(free_port()), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
         str(free_port()), "--temp-dir", str(tmp / "t"), *node_args(num_cpus=2)],
        stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=cli_env())
    try:
        wait_for(lambda: "Ray runtime started" in (tmp / "head.log").read_text(), 120, 0.2, "the head node")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_group(proc, marker=str(tmp))


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_demo_spec(tmp_path, head_with_dashboard):
    """The documented cluster path: `ray job submit --working-dir . -- hisf-bench run SPEC --address auto ...`
    (orchestrator/README.md), the demo spec, tracked where the test reads it back."""
    from ray.job_submission import JobStatus

    job_dir = tmp_path / "project"  # what `--working-dir .` uploads: here just the spec
    (job_dir / "experiments").mkdir(parents=True)
    shutil.copy(ROOT / "experiments" / "demo.yaml", job_dir / "experiments" / "demo.yaml")
    wd = tmp_path / "shared" / "hisf-bench"  # a path every node (here: the one) sees
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head_with_dashboard, "--working-dir", str(job_dir),
         "--submission-id", "hisf-demo", "--no-wait", "--",
         str(BIN / "hisf-bench"), "run", "experiments/demo.yaml", "--address", "auto", "--workdir", str(wd),
         "--tracking-uri", uri, "--optuna-storage", f"sqlite:///{wd / 'optuna.db'}"],
        env=cli_env(), capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    # The job client runs in its own process with the cluster's token in its environment, as a user's shell
    # has it: Ray reads the auth mode once per process, and this test process may have used Ray without it.
    def job(call: str) -> str:
        code = f"from ray.job_submission import JobSubmissionClient as C; print(C({head_with_dashboard!r}).{call})"
        return subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True,
                              timeout=120, check=True).stdout

    ended = {s.value for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)}
    status = wait_for(lambda: (lambda s: s if s in ended else None)(
        job("get_job_status('hisf-demo').value").strip()), 780, 2.0, "the job to end")
    logs = job("get_job_logs('hisf-demo')")
    assert status == JobStatus.SUCCEEDED.value, logs[-5000:]
    assert "[final] done" in logs
    runs = mlflow_children(uri, "demo")
    final = sorted(r.data.tags["hisf.trial_id"] for r in runs if r.data.tags["hisf.stage"] == "final")
    assert final == sorted(f"final-{row}-demo-s{s}" for row in ("clip", "coop", "maple", "hisf", "hicropl")
                           for s in (1, 2, 3))
    search = [r for r in runs if r.data.tags["hisf.stage"] == "search"]
    assert len(search) == 4 and all(r.data.tags["hisf.status"] in ("finished", "pruned") for r in search)
    assert all(r.data.tags["hisf.status"] == "finished" and 0 <= r.data.metrics["hm"] <= 100
               for r in runs if r.data.tags["hisf.stage"] == "final")


@pytest.fixture()
def token_head(monkeypatch):
    """A one-node cluster with token auth (as `ray start` makes it), and its token file."""
    tmp = token_auth(monkeypatch)
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard", "false",
         "--temp-dir", str(tmp / "t"), *node_args()],
        stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Ray runtime started" in (tmp / "head.log").read_text(), 90, 0.2, "the head node")
        yield f"127.0.0.1:{port}", tmp / "token"
    finally:
        stop_group(proc, marker=str(tmp))


def test_a_driver_without_the_clusters_token_gets_one_error_naming_the_fix(tmp_path, demo_root, token_head):
    address, token = token_head
    spec = write_spec(tmp_path / "a.yaml", demo_root, name="auth", rows=[{"name": "CLIP", "method": {"name": "zeroshot"}}])
    env = {k: v for k, v in cli_env().items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec), "--address", address],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    console = out.stdout + out.stderr
    assert out.returncode == 2, console[-3000:]
    (error,) = [ln for ln in console.splitlines() if ln.startswith("error:")]
    assert (f"error: --address {address}: the cluster uses token authentication and this driver sent no token "
            "(RAY_AUTH_MODE is unset): `export RAY_AUTH_MODE=token`") in error, error
    for noise in ("gcs_client", "Traceback", "InvalidAuthToken"):
        assert noise not in console, (noise, console[-3000:])
    assert (tmp_path / "hisf-bench" / "logs" / "ray-connect.log").read_text().count("InvalidAuthToken") > 1
    # With the fix the message names, the same command connects and runs.
    fixed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec), "--address", address],
                           cwd=tmp_path, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
                           capture_output=True, text=True, timeout=240)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "auth")[0].data.tags["hisf.status"] == "finished"
