"""Real multi-process infrastructure: a two-node Ray cluster on this machine, and a real `mlflow server`."""

import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orch_helpers import free_port, mlflow_children, run_cli, stop_group, wait_for, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BIN = Path(sys.executable).parent


@pytest.fixture()
def two_node_cluster(monkeypatch):
    """`ray start --head` plus `ray start --address`, one CPU each, token auth with a test-only token."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    port = free_port()

    def node_args():
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block", "--disable-usage-stats",
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]

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
    out = run_cli(["sweep", spec, "--address", two_node_cluster], cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "cluster")
    assert len(runs) == 4 and all(r.data.tags["hisf.status"] == "finished" for r in runs)
    nodes = {r.data.tags["hisf.node"] for r in runs}
    assert len(nodes) == 2, nodes  # one CPU per node, two trials at once: both nodes ran trials
    assert all(0 <= r.data.metrics["hm"] <= 100 for r in runs)


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        stdout=open(store / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 120, 0.5, "mlflow server health")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, marker=str(store))


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
