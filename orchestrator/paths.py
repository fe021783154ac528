"""Deleting files and folders: only strictly inside a folder we own, checked on every call.

Every deletion of the orchestrator goes through `remove_tree`: a trial folder inside the workdir's
`runs/<spec>/`, Tune's and Ray Train's copies inside the workdir's `ray_results/`, a trial's checkpoint folder
inside its own output_dir. A path that resolves elsewhere (a spec value, a symlink, `..`) is refused with
an error naming both paths, and nothing is deleted.
"""

from __future__ import annotations

import posixpath
import shutil
from pathlib import Path
from typing import Any


class DeletionRefused(RuntimeError):
    """A deletion outside the folder that owns it; the message names the path and the owner."""


def is_strictly_inside(path: str | Path, owner: str | Path) -> bool:
    """`path` lies below `owner` (not equal to it), after resolving symlinks and `..` in both."""
    p, o = Path(path).resolve(), Path(owner).resolve()
    return p != o and o in p.parents


def check_inside(path: str | Path, owner: str | Path, what: str = "path") -> None:
    owner_r = Path(owner).resolve()
    if owner_r == Path(owner_r.anchor):
        raise DeletionRefused(f"refusing to delete {what} {path}: its owner folder {owner} is the file system root")
    if not is_strictly_inside(path, owner):
        raise DeletionRefused(f"refusing to delete {what} {path} ({Path(path).resolve()}): it is not inside "
                              f"{owner_r}, the folder hisf-bench owns for it")


def remove_tree(path: str | Path, owner: str | Path, what: str = "folder") -> bool:
    """Delete the file or folder `path` (with everything in it) if it is strictly inside `owner`; raises
    DeletionRefused otherwise. Returns whether something was deleted (a missing path is no error)."""
    check_inside(path, owner, what)
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
        return True
    if p.is_dir():
        shutil.rmtree(p)
        return True
    return False


def remove_remote_tree(fs: Any, path: str, owner: str, what: str = "folder") -> bool:
    """`remove_tree` on a pyarrow file system (the Ray storage folder, local or on shared storage): the paths
    are compared as normalised POSIX paths, since a remote store has no symlinks to resolve."""
    import pyarrow.fs as pafs

    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return remove_tree(path, owner, what)
    p, o = posixpath.normpath(str(path)), posixpath.normpath(str(owner))
    if o in ("", ".", "/") or not p.startswith(o.rstrip("/") + "/"):
        raise DeletionRefused(f"refusing to delete {what} {path}: it is not inside {owner}, the folder hisf-bench owns for it")
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        return False
    return True
