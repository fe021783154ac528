"""One launch per workdir and spec at a time: a lock file that says who holds it.

Two `run`s of one spec in one workdir would share trial folders, Tune's experiment folder and the stores'
parent runs. A launch (`run`, `sweep`, `search`, `final`) holds `<workdir>/locks/<spec>.lock` while it runs:
an exclusive `flock` (released by the kernel however the holder ends, SIGKILL included) on a file that records
the holder (pid, host, command, since when), so a second launch can say who holds it. A record left by a
holder that is gone (its lock released without a clean exit) is taken over, with a note naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, TextIO

from orchestrator.spec import SpecError


class LockHeld(SpecError):
    """Another launch of the same spec runs in this workdir."""


def lock_path(workdir: str | Path, spec_name: str) -> Path:
    return Path(workdir) / "locks" / f"{spec_name}.lock"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        record = json.loads(raw.decode(errors="replace")) if raw.strip() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


def describe(record: dict) -> str:
    """`pid 123 on host gpu1 since 2026-01-01 10:00:00 (hisf-bench run experiments/demo.yaml)`."""
    since = record.get("since") or "an unknown time"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {since}"
            f" ({record.get('command') or 'unknown command'})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def launch_lock(workdir: str | Path, spec_name: str, command: str, out: TextIO) -> Iterator[Path]:
    """Hold the spec's lock in `workdir` for the block; raises LockHeld naming the holder when another launch
    has it."""
    path = lock_path(workdir, spec_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the processes Ray starts
    host = socket.gethostname()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise LockHeld(_held_message(path, workdir, spec_name, _read(fd))) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # A file system without locks: judge by the record alone (a live pid on this host holds it).
            locked = False
        previous = _read(fd)
        if previous and not locked:
            if previous.get("host") != host or _pid_alive(previous.get("pid")):
                raise LockHeld(_held_message(path, workdir, spec_name, previous))
        if previous:
            print(f"note: took over the lock {path} of a launch that is no longer running: {describe(previous)}",
                  file=out)
        _write(fd, {"pid": os.getpid(), "host": host, "command": command,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started": time.time()})
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a clean end: nothing for the next launch to take over
    finally:
        os.close(fd)


def _held_message(path: Path, workdir, spec_name: str, holder: dict) -> str:
    return (f"--workdir {workdir}: spec {spec_name!r} is already being run there by {describe(holder)}; "
            f"two launches of one spec in one workdir would share its trial folders and runs. Wait for it to end "
            f"(`hisf-bench status` shows its progress), stop it, or pass another --workdir (lock file: {path})")
