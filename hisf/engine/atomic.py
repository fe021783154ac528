"""Atomic file writes (temp file in the same folder, fsync, rename): a reader never sees half a file.

A write that fails for want of space (ENOSPC, or EDQUOT over a quota) is raised as that OSError naming the file
being written: torch wraps the error of the underlying write in a RuntimeError that names neither."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in `exc` or the exceptions it was raised from, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _atomic(path: str | Path, mode: str, write: Callable[[Any], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = no_space_error(e)
        if full is not None:
            raise OSError(full.errno, os.strerror(full.errno), str(path)) from e
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace."""
    import torch

    _atomic(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic(path, "w", lambda f: f.write(text))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic(path, "wb", lambda f: f.write(data))
