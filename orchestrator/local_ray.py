"""The local Ray a stage starts when no `--address` is given: bound to loopback only, and stopped by a watchdog
when the driver dies without stopping it.

Loopback: on Linux Ray takes the machine's outward IP as the node address even when given 127.0.0.1
(`services.resolve_ip_for_localhost`), and its GCS, raylet, workers, metrics endpoints and agents then listen on
that address or on every interface, without authentication on the metrics ports. Ray keeps a single-machine
node on 127.0.0.1 only where multi-node clusters are off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read as
`ray_constants.ENABLE_RAY_CLUSTER`); a local session turns that off for its lifetime, so the node address,
the dashboard host and every port Ray opens are on 127.0.0.1.

Watchdog: a driver killed with SIGKILL (or by a closed terminal) cannot run `ray.shutdown()`. Ray's GCS and
raylet die with it, but the dashboard and runtime-env agents they started keep running, orphaned. A small
process (`python -m orchestrator.local_ray`, its own session, so a Ctrl-C to the driver's group does not reach
it) holds the read end of a pipe whose write end only the driver holds; it learns the processes the driver's
Ray started (pid and start time, so a reused pid is never taken for one of them) and, when the pipe closes
without the driver saying it shut Ray down, stops those still running (SIGTERM, then SIGKILL).

This module's top level imports nothing heavy: the watchdog runs it as a script.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_CLEAN = b"ray stopped\n"
SCAN_SECONDS = 1.0


@contextlib.contextmanager
def loopback_only():
    """While the block runs, Ray (this process and every process it starts) keeps a local node on 127.0.0.1."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_ENV] = "0"  # the processes Ray starts read it when they import ray
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = saved_env


@contextlib.contextmanager
def local_ray(num_cpus: int, env_vars: dict[str, str], watchdog_log: str | Path | None = None):
    """A local Ray on loopback for the block, with a watchdog that stops it if this process dies first."""
    import ray

    with loopback_only():
        before = set(children(os.getpid()))
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                 runtime_env={"env_vars": env_vars}, log_to_driver=True, configure_logging=False)
        started = [p for p in children(os.getpid()) if p not in before]
        dog = Watchdog.start(started, watchdog_log)
        try:
            yield
        finally:
            ray.shutdown()
            dog.release()


class Watchdog:
    """Driver side of the watchdog: the pipe's write end, and the watchdog process."""

    def __init__(self, proc: subprocess.Popen | None, fd: int | None):
        self.proc, self.fd = proc, fd

    @classmethod
    def start(cls, roots: list[int], log: str | Path | None) -> "Watchdog":
        if not Path("/proc/self/stat").is_file():  # no /proc: nothing to learn the processes from
            return cls(None, None)
        r, w = os.pipe()  # both ends non-inheritable: no process Ray starts holds the write end open
        args = [sys.executable, "-m", "orchestrator.local_ray", str(os.getpid()), str(r), *map(str, roots)]
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "a") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(args, pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        finally:
            os.close(r)
            if log:
                out.close()
        return cls(proc, w)

    def release(self) -> None:
        """Ray was shut down by the driver: the watchdog leaves."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, _CLEAN)
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


# ---- /proc -----------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, else None."""
    try:
        # The command name in parentheses may hold any bytes, ')' included: split after the last one.
        fields = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def _table() -> dict[int, tuple[int, int]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                out[int(d)] = st
    return out


def children(pid: int) -> list[int]:
    return [p for p, (ppid, _) in _table().items() if ppid == pid]


def descendants(roots: dict[int, int], table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of every live process in `roots` (same start time) and below them."""
    found = {p: t for p, t in roots.items() if p in table and table[p][1] == t}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for p, (ppid, t) in table.items():
            if ppid == parent and p not in found:
                found[p] = t
                frontier.append(p)
    return found


# ---- the watchdog process --------------------------------------------------------------------------------


def watch(driver: int, fd: int, roots: list[int]) -> int:
    table = _table()
    known = descendants({p: table[p][1] for p in roots if p in table}, table)
    said = b""
    while True:
        ready, _, _ = select.select([fd], [], [], SCAN_SECONDS)
        if ready:
            chunk = os.read(fd, 64)
            if chunk:
                said += chunk
                continue
            break  # the write end closed: the driver released us or died
        known.update(descendants(known, _table()))
    if said == _CLEAN:
        return 0
    left = descendants(known, _table())
    if not left:
        return 0
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} local_ray watchdog: driver {driver} ended without stopping its "
          f"Ray; stopping {len(left)} process(es) it started: {sorted(left)}", flush=True)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid in descendants(left, _table()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end and descendants(left, _table()):
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]))
