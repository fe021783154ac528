"""Reading torch files safely: tensors and plain containers only (`weights_only=True`), one clear error otherwise.

Every torch.load of the project goes through here (trial checkpoints, exported prompts, a backbone's local
weights, Dassl files). A file that is not one we load is reported by name with what it holds instead; the
advice torch prints (retry with `weights_only=False`) is never repeated: that would run whatever the file
pickled.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(path: str | Path, what: str, error: Callable[[str], Exception] = ValueError, key: str = "",
              pickled_hint: str = "") -> Any:
    """torch.load(path, weights_only=True) on the CPU, or `error("KEY: PATH: not a WHAT we load: why")` when the
    file is missing or holds anything but tensors and plain containers (a pickled object, another format,
    junk); `pickled_hint` is added when it holds pickled objects (what to give instead)."""
    import torch

    path = Path(path)
    where = f"{key}: {path}" if key else str(path)
    if not path.is_file():
        raise error(f"{where}: {what} file not found")
    try:
        with warnings.catch_warnings():
            # Pickle protocols above 2 load fine; torch's note about them is noise here.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the reader raised, the answer is the same: not ours
        why, pickled = _why(path, e)
        hint = f". {pickled_hint}" if pickled and pickled_hint else ""
        raise error(f"{where}: not a {what} we load: {why}{hint}") from None


def _why(path: Path, e: Exception) -> tuple[str, bool]:
    """(why torch could not read it, whether it holds pickled objects)."""
    text = str(e)
    found = _GLOBAL.search(text)
    if found:
        return (f"it holds a pickled Python object ({found.group(1)}), and we read only tensors and plain "
                "containers (safe loading)"), True
    if path.stat().st_size == 0:
        return "the file is empty", False
    with path.open("rb") as f:
        head = f.read(2)
    # A pickle (protocol 2+) starts with PROTO (0x80), torch's zip format with "PK"; anything else is not ours
    # whatever torch's reader made of it (text can parse as pickle opcodes).
    if head[:1] != b"\x80" and head != b"PK":
        return "it is not a torch file", False
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        return "it holds pickled Python code or objects, and we read only tensors and plain containers (safe loading)", True
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = "" if "weights_only" in first else first  # torch's advice to disable safe loading is never passed on
    return f"it is not a torch file ({type(e).__name__}{': ' + first[:200] if first else ''})", False
