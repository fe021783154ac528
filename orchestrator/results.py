"""The trial result protocol: the keys of a Tune result that are ours, and how a result reads as statuses.

A Tune trial runs a group of member trials (docs/fusion.md; one member: a trial alone). It reports each epoch
with `STATUS_KEY: "running", FINAL_KEY: False`, and once at the end with `FINAL_KEY: True` and `MEMBERS_KEY`:
per member trial id, its status (`finished`, `pruned` or `failed`, with `ERROR_KEY` for a bad config) and its
final metrics (the engine's metric names), and a finished single-process member its per-class results
(`CLASSES_KEY`). A Tune trial whose last result is not final did not end by itself (killed, errored in Ray): all
its members count as failed.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

STATUS_KEY = "hisf_status"
FINAL_KEY = "hisf_final"
ERROR_KEY = "hisf_error"
# A group's final result: JSON {member trial id: {STATUS_KEY, ERROR_KEY?, metrics...}} (a string: Tune keeps it whole).
MEMBERS_KEY = "hisf_members"
# A finished member's per-class results as reports read them: {split: {"classnames", "per_class_accuracy"}}, from
# the eval/<split>.json files the engine wrote; the driver puts them in the launch's record (orchestrator/records.py)
# so a report reads them without one download per run.
CLASSES_KEY = "hisf_classes"
CLASS_FIELDS = ("classnames", "per_class_accuracy")

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


def member_results(result: Mapping[str, Any] | None, member_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each member's final record from a group's last result; every member failed when the result is not final."""
    result = result or {}
    recorded = json.loads(result[MEMBERS_KEY]) if result.get(FINAL_KEY) and result.get(MEMBERS_KEY) else {}
    out = {}
    for tid in member_ids:
        rec = dict(recorded.get(tid) or {STATUS_KEY: "failed"})
        if rec.get(STATUS_KEY) not in STATUSES:
            rec[STATUS_KEY] = "failed"
        out[tid] = rec
    return out


def group_result(members: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A group's final report: its members' records, and the group's own status (failed when any member failed);
    a group of one also carries its member's numbers at the top, as Tune's own tables show a trial's."""
    statuses = [m.get(STATUS_KEY) for m in members.values()]
    status = "failed" if "failed" in statuses else "finished"
    own = numbers(next(iter(members.values()))) if len(members) == 1 else {}
    return {**own, STATUS_KEY: status, FINAL_KEY: True, MEMBERS_KEY: json.dumps(members, default=str)}


def epoch_report(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A group's report at an epoch boundary: how many members reported, the best epoch and val_acc among them, and
    with one member its own epoch metrics (what Tune's tables of a trial alone show)."""
    report: dict[str, Any] = {STATUS_KEY: "running", FINAL_KEY: False, "members_reported": len(records)}
    if len(records) == 1:
        report.update(numbers(records[0]["metrics"]))
    for key in ("epoch", "val_acc"):
        values = [float(r["metrics"][key]) for r in records if key in r["metrics"]]
        if values:
            report[f"max_{key}"] = max(values)
    return report


def class_summaries(eval_dir: str | None) -> dict[str, dict[str, list]]:
    """split (`base`, `novel`, `target/<key>`, ...) -> the fields of its eval/<split>.json a report reads; {} when the
    trial wrote none. Not the confusion matrix: C x C counts (megabytes for ImageNet) would ride in every result."""
    from pathlib import Path

    out: dict[str, dict[str, list]] = {}
    if not eval_dir or not Path(eval_dir).is_dir():
        return out
    for path in sorted(Path(eval_dir).rglob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and all(k in record for k in CLASS_FIELDS):
            out[path.relative_to(eval_dir).with_suffix("").as_posix()] = {k: record[k] for k in CLASS_FIELDS}
    return out
