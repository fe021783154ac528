"""Deleting files and folders: only strictly inside a folder we own, checked on every call.

The one place a tree is deleted, for the engine (a trial's checkpoint folder inside its output_dir) and, through
orchestrator/paths.py, for the orchestrator (trial folders, Tune's copies, a stores server's socket folder). A path
that resolves elsewhere (a spec value, a symlink, `..`) is refused with an error naming both paths, and nothing is
deleted.
"""

from __future__ import annotations

import shutil
from pathlib import Path


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
