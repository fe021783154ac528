"""The trial result protocol: the keys of a Tune result that are ours, and how a result reads as a status.

A trial reports each epoch's metrics with `STATUS_KEY: "running", FINAL_KEY: False`, and once at the end with
`FINAL_KEY: True` and its status (`finished`, `pruned` or `failed`, with `ERROR_KEY` for a bad config).
Everything else in a result is the engine's metric names. A trial whose last result is not final did not
end by itself (killed, errored in Ray): it counts as failed.
"""

from __future__ import annotations

from typing import Any, Mapping

STATUS_KEY = "hisf_status"
FINAL_KEY = "hisf_final"
ERROR_KEY = "hisf_error"

STATUSES = ("finished", "running", "failed", "pruned")
# A trial in one of these states is on record and done: its run is kept, its checkpoints can go.
DONE = ("finished", "pruned")


def final_status(result: Mapping[str, Any] | None) -> str:
    """The status a trial's last result says: its own when final, else `failed`."""
    result = result or {}
    status = result.get(STATUS_KEY) if result.get(FINAL_KEY) else "failed"
    return status if status in STATUSES else "failed"


def is_done(result: Mapping[str, Any] | None) -> bool:
    """The trial ended by itself as finished or pruned (and so is on record)."""
    return bool(result) and bool(result.get(FINAL_KEY)) and result.get(STATUS_KEY) in DONE


def numbers(d: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict as floats (bools, strings and our protocol keys dropped)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
