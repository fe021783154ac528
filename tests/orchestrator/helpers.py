"""Helpers for orchestrator tests: small specs, the CLI in a subprocess, process bookkeeping, MLflow queries.

Ports, child environments and demo shards come from tests.support (shared by every test package)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.support import ROOT, child_env, free_port  # noqa: F401  (the orchestrator tests' one import)

DEMO_SPEC = ROOT / "experiments" / "demo.yaml"


def demo_raw() -> dict:
    """experiments/demo.yaml as the dict a spec file holds."""
    return yaml.safe_load(DEMO_SPEC.read_text())


def write_spec(path: Path, demo_root: Path, rows, search=None, seeds=(1,), epochs=2, shots=4,
               max_concurrent=2, max_failures=2, name="t", fuse=1) -> Path:
    spec = {
        "name": name, "protocol": "base2new",
        "data": {"root": str(demo_root), "datasets": ["demo"], "shots": shots},
        "base": {"backbone": {"name": "hisf-tiny", "pretrained": None}, "device": "cpu",
                 "train": {"epochs": epochs, "batch_size": 4, "precision": "fp32", "warmup_epochs": 0,
                           "eval_batch_size": 64, "log_every": 0}},
        "rows": rows,
        "final": {"seeds": list(seeds)},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": max_concurrent, "max_failures": max_failures,
                      "fuse": fuse},
    }
    if search:
        spec["search"] = search
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_env() -> dict:
    """The environment of an `orchestrator.cli` subprocess (tests.support.child_env)."""
    return child_env()


def run_cli(args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], cwd=cwd, env=cli_env(),
                         capture_output=True, text=True, timeout=timeout)
    return out


def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), read from /proc."""
    ppids = _ppids()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in ppids.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def pids_with(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (a temp path unique to one test)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mlflow_children(uri: str, experiment: str, stage: str | None = None):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    out = [r for r in runs if "hisf.trial_id" in r.data.tags]
    if stage:
        out = [r for r in out if r.data.tags.get("hisf.stage") == stage]
    return out


def stop_group(proc: subprocess.Popen, marker: str | None = None, grace: float = 3.0) -> None:
    """Stop a process started with start_new_session=True and everything in its group (by pgid), then any
    straggler whose command line holds `marker` (a temp path only this test uses)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        end = time.monotonic() + wait
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if marker:
        kill_pids(pids_with(marker))


def checkpoint_epoch(path: Path) -> int:
    """The epoch of the engine's checkpoint at `path`; 0 while it is absent or being written."""
    import torch

    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["epoch"])
    except Exception:  # being written (atomic rename) or not there yet
        return 0


def sweep_and_kill(spec_path: Path, cwd: Path, ready, what: str, pid_file: Path, state: Path,
                   ready_timeout: float, run_timeout: float) -> tuple[int, str, int]:
    """Run `hisf-bench sweep SPEC` as a driver process, SIGKILL the pid written in `pid_file` once `ready()`
    holds, and wait for the driver; returns (its exit code, its output, the checkpoint epoch at the kill)."""
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path)], cwd=cwd,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_for(ready, ready_timeout, 0.02, what)
        killed_at = checkpoint_epoch(state)
        os.kill(int(Path(pid_file).read_text()), signal.SIGKILL)
        out, _ = driver.communicate(timeout=run_timeout)
    finally:
        leftover = descendants(driver.pid)
        if driver.poll() is None:
            driver.kill()
        kill_pids(leftover)
    return driver.returncode, out, killed_at


@contextlib.contextmanager
def mlflow_server_at(store: Path, workers: int = 2):
    """A real `mlflow server` on 127.0.0.1 and a free port over a SQLite store in `store`; yields its URL."""
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers)],
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



def stores_root() -> Path:
    """A folder for a test's stores that PostgreSQL's unprivileged user (when tests run as root) can reach:
    pytest's own tmp folders are private to root."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hs", dir="/tmp"))
    root.chmod(0o711)
    return root


@contextlib.contextmanager
def postgres_stores(workers: int = 2):
    """A real PostgreSQL cluster (initdb'd into a temporary folder, loopback and a private unix socket) and a
    real `mlflow server` on it serving artifacts from its own folder (orchestrator.stores.serving); yields the
    Stores, whose tracking_uri / optuna_storage are the flags a user passes."""
    import shutil

    from orchestrator.stores import serving

    root = stores_root()
    try:
        with serving(root / "stores", port=free_port(), pg_port=free_port(), workers=workers, durable=False) as st:
            yield st
    finally:
        shutil.rmtree(root, ignore_errors=True)


def search_spec(n_trials: int = 4) -> dict:
    """The demo's search block (HISF's λ1, λ2 by TPE with median pruning) with `n_trials` trials."""
    return {"sampler": "tpe", "n_trials": n_trials, "startup_trials": 2, "seed": 1, "metric": "val_acc",
            "pruner": "median", "params": {"method.lambda_le": {"low": 0.0, "high": 2.0},
                                           "method.lambda_sa": {"low": 0.0, "high": 2.0}}}


def listening_sockets(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket (IPv4 and IPv6) held by one of `pids`, from /proc."""
    import socket

    wanted, inodes = set(pids), {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            inodes[f[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    out = []
    for pid in wanted:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                out.append((pid, *inodes[target[8:-1]]))
    return sorted(set(out))


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def finished_runs(db: Path) -> int:
    """Runs tagged hisf.status=finished in an MLflow SQLite store, read with read-only SQL: a driver may be writing it
    (an MlflowClient here would race it creating the store); 0 while it does not exist or is locked."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("select count(*) from tags where key='hisf.status' and value='finished'").fetchone()[0]
    except sqlite3.Error:
        return 0
