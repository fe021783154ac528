"""The local Ray a stage starts: every socket it listens on is on loopback, and a driver killed with SIGKILL
leaves none of the processes its Ray started running (orchestrator/local_ray.py's watchdog)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.spec import load_spec
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import (
    ROOT,
    alive,
    cli_env,
    cmdline,
    descendants,
    is_loopback,
    kill_pids,
    listening_sockets,
    wait_for,
    write_spec,
)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_local_sweep_listens_on_loopback_only_and_a_killed_driver_leaves_nothing(tmp_path, demo_root):
    spec_path = write_spec(tmp_path / "l.yaml", demo_root, name="loop", epochs=200, max_concurrent=1,
                           rows=[{"name": "CoOp", "method": {"name": "coop"}}])
    (trial,) = expand_sweep(load_spec(spec_path), tmp_path / "hisf-bench")
    pid_file = Path(trial.config.output_dir) / "worker.pid"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path)], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    tree: list[int] = []
    try:
        wait_for(pid_file.is_file, 240, 0.2, "the trial to start")
        worker = int(pid_file.read_text())
        time.sleep(2)  # the worker's and agents' servers are up by the time it trains
        tree = descendants(driver.pid)
        sockets = listening_sockets([driver.pid, *tree])
        names = {pid: cmdline(pid) for pid, _, _ in sockets}
        # Not vacuous: the GCS, the raylet, the agents, the trial's worker and the driver all listen.
        for part in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
            assert any(part in n for n in names.values()), (part, names)
        assert worker in names and driver.pid in names, names
        exposed = [(pid, addr, port, names[pid][:60]) for pid, addr, port in sockets if not is_loopback(addr)]
        assert not exposed, exposed

        # SIGKILL the driver alone (no ray.shutdown()); whatever its Ray started stops soon after.
        ray_procs = [p for p in tree if "orchestrator.local_ray" not in cmdline(p)]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)

        def none_left():
            return not [p for p in ray_procs if alive(p)]

        wait_for(none_left, 90, 0.5, "the killed driver's Ray processes to stop: "
                 + "; ".join(f"{p} {cmdline(p)[:60]}" for p in ray_procs if alive(p)))
        log = (tmp_path / "hisf-bench" / "logs" / "ray-watchdog.log").read_text()
        assert f"driver {driver.pid} ended without stopping its Ray" in log, log
    finally:
        if driver.poll() is None:
            tree += descendants(driver.pid)
            driver.kill()
        kill_pids(tree)


FAKE_DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    from orchestrator.local_ray import Watchdog, children
    # What ray.init starts: a child that starts a grandchild (an agent), which outlives its parent.
    child = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"])
    time.sleep(1.5)
    dog = Watchdog.start(children(os.getpid()), sys.argv[1])
    print(" ".join(map(str, [child.pid] + [p for p in children(child.pid)])), flush=True)
    if sys.argv[2] == "release":
        sys.stdin.readline()  # the test has seen the processes
        child.kill(); child.wait()
        dog.release()
        print("released", flush=True)
    time.sleep(300)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["killed", "release"])
def test_the_watchdog_stops_what_a_dead_driver_started_and_leaves_after_a_clean_stop(tmp_path, how):
    script = tmp_path / "driver.py"
    script.write_text(FAKE_DRIVER)
    log = tmp_path / "dog.log"
    env = {**cli_env(), "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, str(script), str(log), how], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    procs: list[int] = []
    try:
        procs = [int(p) for p in driver.stdout.readline().split()]
        assert len(procs) == 2 and all(alive(p) for p in procs), procs
        dog = [p for p in descendants(driver.pid) if "orchestrator.local_ray" in cmdline(p)]
        if how == "killed":
            assert len(dog) == 1, ([(p, cmdline(p)) for p in descendants(driver.pid)], log.read_text())
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=10)
            wait_for(lambda: not [p for p in procs if alive(p)], 30, 0.2, "the orphaned processes to stop")
            wait_for(lambda: not alive(dog[0]), 30, 0.2, "the watchdog to leave")
            assert (f"driver {driver.pid} ended without stopping its Ray; stopping 2 process(es) it started: "
                    f"{sorted(procs)}") in log.read_text()
        else:
            driver.stdin.write("go\n")
            driver.stdin.flush()
            assert driver.stdout.readline().strip() == "released"
            # A clean stop: the watchdog has left, and touched nothing (the grandchild, orphaned on purpose, lives).
            assert not [p for p in descendants(driver.pid) if "orchestrator.local_ray" in cmdline(p)]
            assert alive(procs[1]) and log.read_text() == ""
    finally:
        if driver.poll() is None:
            procs += descendants(driver.pid)
            driver.kill()
        kill_pids(procs)
