"""Deleting files and folders for the orchestrator: only strictly inside a folder we own, checked on every call.

Every deletion of the orchestrator goes through `remove_tree` (hisf/deletion.py, the engine's too): a trial folder
inside the workdir's `runs/<spec>/`, Tune's and Ray Train's copies inside the workdir's `ray_results/`, a trial's
checkpoint folder inside its own output_dir, a stores server's socket folder inside the temp folder. A path that
resolves elsewhere (a spec value, a symlink, `..`) is refused with an error naming both paths, and nothing is
deleted. `remove_remote_tree` is the same rule on a pyarrow file system.
"""

from __future__ import annotations

import posixpath
from typing import Any

from hisf.deletion import DeletionRefused, check_inside, is_strictly_inside, remove_tree

__all__ = ["DeletionRefused", "check_inside", "is_strictly_inside", "remove_remote_tree", "remove_tree"]


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
