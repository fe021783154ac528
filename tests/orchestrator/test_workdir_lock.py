"""One launch of a spec per workdir: a second `run` stops at once naming the holder; a dead holder's lock is
taken over with a note; a clean end leaves nothing to take over."""

import io
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from orchestrator.workdir_lock import LockHeld, launch_lock, lock_path
from tests.orchestrator.helpers import ROOT, cli_env, run_cli, write_spec

pytestmark = pytest.mark.timeout(120)

HOLDER = """
import sys, time
from orchestrator.workdir_lock import launch_lock
with launch_lock(sys.argv[1], "locked", "hisf-bench run experiments/locked.yaml --workdir W", sys.stdout):
    print("held", flush=True)
    time.sleep(300)
"""


def _holder(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env={**cli_env(), "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_of_the_spec_in_the_workdir_says_who_holds_it(tmp_path, demo_root):
    spec = write_spec(tmp_path / "s.yaml", demo_root, name="locked", rows=[{"name": "CoOp", "method": {"name": "coop"}}])
    wd = tmp_path / "hisf-bench"
    holder = _holder(wd)
    try:
        out = run_cli(["run", spec], cwd=tmp_path, timeout=60)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        err = out.stderr
        assert f"spec 'locked' is already being run there by pid {holder.pid} on host {socket.gethostname()} since " in err
        assert "(hisf-bench run experiments/locked.yaml --workdir W)" in err and "--workdir" in err, err
        assert "Traceback" not in err and not (wd / "mlflow.db").exists()
        # The dry run and `status` read only: they take no lock.
        assert run_cli(["run", spec, "--dry-run"], cwd=tmp_path, timeout=60).returncode == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_note_and_a_clean_end_leaves_none(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean end: its record stays, the kernel released its flock
    holder.wait()
    out = io.StringIO()
    with launch_lock(tmp_path, "locked", "hisf-bench run again.yaml", out) as path:
        assert path == lock_path(tmp_path, "locked")
        note = out.getvalue()
        assert note.startswith(f"note: took over the lock {path} of a launch that is no longer running: "
                               f"pid {holder.pid} on host {socket.gethostname()} since "), note
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["command"] == "hisf-bench run again.yaml"
        # Held here: another launch (another open file description, as another process has) is refused.
        with pytest.raises(LockHeld, match=rf"already being run there by pid {os.getpid()} .*hisf-bench run again.yaml"):
            with launch_lock(tmp_path, "locked", "x", io.StringIO()):
                pass
        # Another spec in the same workdir has its own lock.
        with launch_lock(tmp_path, "other", "y", io.StringIO()):
            pass
    quiet = io.StringIO()
    with launch_lock(tmp_path, "locked", "z", quiet):
        pass
    assert quiet.getvalue() == ""
