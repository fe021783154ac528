"""A full disk, wherever it shows: recognised in any exception, told in one line naming the path, and the stage
stopped (a full disk fails every retry and every later trial alike).

It shows as an OSError with ENOSPC (EDQUOT over a quota) from our own writes (`hisf.engine.atomic` names the
file), as SQLite's "database or disk is full" from an MLflow or Optuna store, or wrapped in another error
(torch's writer, MLflow's exceptions). A trial that hits it reports it (`DISK_FULL_KEY`) instead of raising, so
Tune does not retry it; `StopOnDiskFull` then ends the stage, and the runner raises DiskFull.
"""

from __future__ import annotations

import errno
import re
from typing import Any

from ray import tune

from hisf.engine.atomic import no_space_error

DISK_FULL_KEY = "hisf_disk_full"
SQLITE_FULL = "database or disk is full"
# How Python prints such an OSError: what is left of it in an error passed on as text (a Ray worker's).
_PRINTED = re.compile(r"\[Errno (%d|%d)\] [^:\n]+: '([^'\n]+)'" % (errno.ENOSPC, errno.EDQUOT))


class DiskFull(Exception):
    """No space left where the stage writes; the message is the one line the user sees."""


def disk_full(exc: BaseException, store: str | None = None) -> str | None:
    """One line naming the path and ENOSPC when `exc` (or what it was raised from) is a full disk, else None.
    `store`: the URL of the store that was being written, named when SQLite says it is full."""
    if isinstance(exc, DiskFull):
        return str(exc)
    err = no_space_error(exc)
    if err is not None:
        where = err.filename or "a file"
        return f"no space left on device writing {where} ({errno.errorcode.get(err.errno, err.errno)})"
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if SQLITE_FULL in text:
            return f"no space left on device writing the SQLite store {store or '(see the error above)'} (ENOSPC: {SQLITE_FULL})"
        printed = _PRINTED.search(text)
        if printed:
            return f"no space left on device writing {printed.group(2)} ({errno.errorcode[int(printed.group(1))]})"
        exc = exc.__cause__ or exc.__context__
    return None


class StopOnDiskFull(tune.Stopper):
    """Ends the whole stage once a trial reports a full disk: every other trial would fail the same way."""

    def __init__(self):
        self.message: str | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get(DISK_FULL_KEY) and self.message is None:
            self.message = str(result[DISK_FULL_KEY])
        return False

    def stop_all(self) -> bool:
        return self.message is not None
