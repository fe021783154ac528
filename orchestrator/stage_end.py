"""How a stage ends: finished or failed with its statuses counted, or interrupted (Ctrl-C) with the trials it cut
short marked KILLED; either way its parent run closes with the launch's record (orchestrator/records.py)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from orchestrator.results import CLASSES_KEY, DONE, STATUS_KEY
from orchestrator.resume import STALE_TAG
from orchestrator.scheduling import Interrupted


@dataclass
class StageResult:
    stage: str
    parent_run_id: str
    trials: int
    skipped: int
    statuses: dict[str, int]
    results: dict[str, dict] = field(default_factory=dict)
    wall_seconds: float = 0.0


class StageInterrupted(Exception):
    """Ctrl-C stopped a stage: what its launch holds as finished (or pruned), failed, cut short and never started."""

    def __init__(self, stage: str, parent_run_id: str, counts: dict[str, int], seconds: float):
        self.stage, self.parent_run_id, self.counts, self.seconds = stage, parent_run_id, counts, seconds
        super().__init__(self.summary())

    def summary(self) -> str:
        c = self.counts
        return (f"[{self.stage}] interrupted after {self.seconds:.1f}s: {c['finished']} finished, {c['failed']} failed, "
                f"{c['cut short']} cut short, {c['never started']} never started "
                f"(MLflow parent run {self.parent_run_id} marked KILLED)")


@dataclass
class _Stage:
    """What closing_stage needs to say how far a stage got: its trial count, known once the stage is planned."""

    total: int = 0


@contextlib.contextmanager
def closing_stage(stage: str, tracker, parent: str, started: float):
    """A stage's parent run never stays RUNNING: an interruption (Ctrl-C) marks it and the trials it cut short
    KILLED and raises StageInterrupted with the counts; any other exception (a full disk, a store that fails)
    closes it FAILED with the reason, the trials it cut short KILLED."""
    info = _Stage()
    try:
        yield info
    except (Interrupted, KeyboardInterrupt):
        counts = settle(tracker, parent, info.total, "KILLED", "interrupted (Ctrl-C)")
        raise StageInterrupted(stage, parent, counts, time.perf_counter() - started) from None
    except BaseException as e:
        settle(tracker, parent, info.total, "FAILED", f"{type(e).__name__}: {e}")
        raise


def settle(tracker, parent: str, total: int, status: str, reason: str) -> dict[str, int]:
    """Count the launch's trials by their newest run; runs still RUNNING were cut short: marked KILLED (and
    `hisf.status` interrupted, which `--resume` continues). The parent run ends with `status` and `reason`.
    The store may be what failed (a full disk): what cannot be written is left."""
    counts = {"finished": 0, "failed": 0, "cut short": 0}
    try:
        newest: dict[str, object] = {}
        for r in sorted(tracker.children(parent), key=lambda r: r.info.start_time or 0):
            if STALE_TAG not in r.data.tags and "hisf.trial_id" in r.data.tags:
                newest[r.data.tags["hisf.trial_id"]] = r
            elif r.data.tags.get("hisf.kind") == "group" and r.info.status == "RUNNING":
                with contextlib.suppress(Exception):  # a fused group's own run, cut short with its members
                    tracker.end_stage(r.info.run_id, "KILLED")
    except Exception:
        newest = {}
    for r in newest.values():
        s = r.data.tags.get("hisf.status")
        if s in DONE:
            counts["finished"] += 1
        elif r.info.status == "RUNNING":
            counts["cut short"] += 1
            with contextlib.suppress(Exception):
                tracker.set_tags(r.info.run_id, {"hisf.status": "interrupted"})
                tracker.end_stage(r.info.run_id, "KILLED")
        elif s == "failed":
            counts["failed"] += 1
    counts["never started"] = max(0, total - sum(counts.values()))
    with contextlib.suppress(Exception):
        tracker.set_tags(parent, {"hisf.error": reason[:4000]})
    with contextlib.suppress(Exception):
        tracker.close_stage(parent, status)  # with the launch's record (orchestrator/records.py)
    return counts


def count_statuses(runs) -> dict[str, int]:
    """status -> count over recorded runs."""
    out: dict[str, int] = {}
    for r in runs:
        s = r.data.tags.get("hisf.status", "finished")
        out[s] = out.get(s, 0) + 1
    return out


def finish_stage(stage, tracker, parent, n_trials, reused, results, started) -> StageResult:
    statuses = count_statuses(reused.values())
    for r in results.values():
        statuses[r[STATUS_KEY]] = statuses.get(r[STATUS_KEY], 0) + 1
    ok = statuses.get("failed", 0) == 0
    # With the launch's record (orchestrator/records.py), which carries what trials reported of their per-class results.
    classes = {tid: r[CLASSES_KEY] for tid, r in results.items() if r.get(CLASSES_KEY)}
    tracker.close_stage(parent, "FINISHED" if ok else "FAILED", classes=classes)
    return StageResult(stage=stage, parent_run_id=parent, trials=n_trials, skipped=len(reused),
                       statuses=statuses, results=results, wall_seconds=time.perf_counter() - started)
