"""The Ray Tune function trainable: one Tune trial runs one group of member trials (docs/fusion.md; one member: a
trial alone) from its payload to every member's result on record.

One-device groups run `hisf.engine.run_group` inside the Tune function; each member's epochs go to its own MLflow
run and Optuna trial, and once per epoch the group reports to Tune with one checkpoint holding every member's, so a
retried group (`max_failures`) continues each member from `tune.get_checkpoint()` (orchestrator/resume.py). A
multi-worker group runs its DDP workers through orchestrator/ddp.py. Bad input (config, data, backbone) fails a
member at once, without retries: it fails the same way on every retry. A member's own failure (its NaN guard) is
on its own record and the others go on. The last report follows the result protocol (orchestrator/results.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.disk import DISK_FULL_KEY, disk_full
from orchestrator.groups import TrialGroup
from orchestrator.results import CLASSES_KEY, ERROR_KEY, STATUS_KEY, class_summaries, group_result, numbers
from orchestrator.resume import drop_engine_checkpoint, restore_tune_checkpoint
from orchestrator.trial_callback import TrialBridge, TuneGroupReport, open_trial_run, remove_pid, write_pid
from orchestrator.trials import Trial


@dataclass
class MemberRun:
    """One member on the worker side: its trial, MLflow run, engine callback, and what it ends with."""

    trial: Trial
    run: Any
    bridge: TrialBridge
    attempt: int
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, trial: Trial, ctx: RunContext) -> "MemberRun":
        import ray

        run = open_trial_run(trial, ctx)
        attempt = run.next_attempt()
        run.set_tags({"hisf.node": ray.get_runtime_context().get_node_id(), "hisf.attempts": attempt,
                      "hisf.status": "running"})
        return cls(trial, run, TrialBridge(trial, run, ctx), attempt)

    def fail(self, message: str, quiet: bool = False) -> None:
        """On record as failed with `message`; `quiet`: a store that fails too (on a full disk) is let be."""
        if quiet:
            with contextlib.suppress(Exception):  # the store may sit on the full disk too
                self.run.fail(message)
        else:
            self.run.fail(message)
        remove_pid(self.trial)
        self.record = {STATUS_KEY: "failed", ERROR_KEY: message}


def tune_trainable(config: dict) -> None:
    """The Tune function trainable: config = {"group": TrialGroup.payload(), "ctx": RunContext.to_dict()}."""
    from ray import tune

    from hisf.engine import INPUT_ERRORS

    started = time.perf_counter()
    group = TrialGroup.from_payload(config["group"])
    ctx = RunContext.from_dict(config["ctx"])
    members = [MemberRun.open(t, ctx) for t in group.members]
    group_run = _open_group_run(group, ctx, members)
    for tid, epochs in restore_tune_checkpoint(group).items():
        m = next(m for m in members if m.trial.trial_id == tid)
        m.run.log_metrics({"resumed_from_epoch": epochs}, step=m.attempt)
    for m in members:
        write_pid(m.trial)
    runnable = []
    for m in members:  # a member whose own config is bad fails alone, before the group starts
        try:
            m.trial.config.validate()
            runnable.append(m)
        except INPUT_ERRORS as e:
            m.fail(f"bad trial config (not retried): {e}")
    t0 = time.perf_counter()
    outcomes: list = []
    try:
        if runnable and ctx.workers_per_trial > 1:
            from orchestrator.ddp import fit_ddp

            outcomes = fit_ddp(group, [m.trial for m in runnable], ctx, [m.run for m in runnable])
        elif runnable:
            outcomes = run_engine(runnable, ctx, group.group_id)
    except INPUT_ERRORS as e:
        # The group's own input (its dataset, its backbone) is bad for every member: no retries.
        for m in runnable:
            m.fail(f"bad trial config (not retried): {e}")
        runnable = []
    except Exception as e:
        full = disk_full(e, ctx.tracking_uri)
        if full:  # fails every retry alike: reported (not raised, so not retried) and the stage stops
            for m in runnable:
                m.fail(full, quiet=True)
            _end_group_run(ctx, group_run, members, {}, quiet=True)
            tune.report({**group_result({m.trial.trial_id: m.record for m in members}), DISK_FULL_KEY: full})
            return
        for m in runnable:
            m.run.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        _end_group_run(ctx, group_run, members, {}, failed=True)
        raise
    # The engine's own time excludes what our callbacks spent tracking and reporting inside it; a member's share of
    # a group's time is what it cost (the group's time is on the group's run).
    group_seconds = time.perf_counter() - t0 - sum(m.bridge.track_seconds for m in runnable)
    for m, outcome in zip(runnable, outcomes):
        overhead = max(0.0, time.perf_counter() - started - group_seconds) / len(members)
        _finish_member(m, outcome, ctx, group_seconds / len(runnable), overhead, ddp=ctx.workers_per_trial > 1)
    _end_group_run(ctx, group_run, members, {"group_engine_seconds": group_seconds, "group_size": len(members)})
    result = group_result({m.trial.trial_id: m.record for m in members})
    full = next((m.record[DISK_FULL_KEY] for m in members if m.record.get(DISK_FULL_KEY)), None)
    tune.report({**result, DISK_FULL_KEY: full} if full else result)


def run_engine(members: list[MemberRun], ctx: RunContext, group_id: str) -> list:
    """One device, one process: the members as one group; each member's final metrics or its own error."""
    from hisf.engine import run_group
    from orchestrator.devices import place_trial

    # The device follows the trial's resources (orchestrator/devices.py), not what this process sees.
    cfgs = [place_trial(m.trial.config, ctx.gpus_per_trial) for m in members]
    report = TuneGroupReport([m.trial.trial_id for m in members], ctx, group_id)
    outcomes = run_group(cfgs, [[m.bridge] for m in members], resume=True, group_callbacks=[report])
    members[0].bridge.track_seconds += report.track_seconds
    return outcomes


def _open_group_run(group: TrialGroup, ctx: RunContext, members: list[MemberRun]) -> str | None:
    """A group of several members gets its own MLflow run linking them; each member's run names it."""
    if len(members) < 2:
        return None
    from orchestrator.tracking import open_group_run

    run_id = open_group_run(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, group.group_id,
                            {m.trial.trial_id: m.run.run_id for m in members})
    for m in members:
        m.run.set_tags({"hisf.group": run_id, "hisf.group_size": len(members)})
    return run_id


def _end_group_run(ctx: RunContext, group_run: str | None, members: list[MemberRun], metrics: dict,
                   failed: bool | None = None, quiet: bool = False) -> None:
    if not group_run:
        return
    from orchestrator.tracking import end_group_run

    failed = any(m.record.get(STATUS_KEY) == "failed" for m in members) if failed is None else failed
    if quiet:
        with contextlib.suppress(Exception):
            end_group_run(ctx.tracking_uri, group_run, True, metrics)
    else:
        end_group_run(ctx.tracking_uri, group_run, failed, metrics)


def _finish_member(m: MemberRun, outcome: Any, ctx: RunContext, engine_seconds: float, overhead: float,
                   ddp: bool = False) -> None:
    """A member's outcome on its record: failed with its error, or finished/pruned with its metrics and files (a
    DDP member's rank 0 logged its metrics and files on its own node already)."""
    if isinstance(outcome, BaseException):
        full = disk_full(outcome, ctx.tracking_uri)
        m.fail(full or f"{type(outcome).__name__}: {outcome}", quiet=bool(full))
        if full:
            m.record[DISK_FULL_KEY] = full
        return
    final = numbers({k: v for k, v in (outcome or m.bridge.last).items() if k != "pruned"})
    status = "pruned" if (outcome.get("pruned") if ddp else m.bridge.pruned) else "finished"
    if not ddp:
        m.bridge.log_final(final)
        m.run.log_artifacts(m.bridge.artifacts)
    if m.attempt > 1:
        backfill_epochs(m.run, m.bridge.artifacts.get("metrics"))
    m.run.log_metrics({"orchestration_seconds": overhead, "engine_seconds": engine_seconds}, step=0)
    m.run.finish(status)
    remove_pid(m.trial)
    if not ctx.keep_checkpoints:
        # On record as finished: its checkpoint only served resuming it (Tune's copy goes on the driver).
        drop_engine_checkpoint(m.trial.config.output_dir)
    m.record = {**final, STATUS_KEY: status, "engine_seconds": engine_seconds, "orchestration_seconds": overhead}
    if not ddp:  # (a DDP member's files are on its rank 0's node: reports download them)
        classes = class_summaries(m.bridge.artifacts.get("eval"))
        if classes:
            m.record[CLASSES_KEY] = classes


def backfill_epochs(run, metrics_json: str | None) -> None:
    """A kill between the engine's checkpoint and our epoch log loses that epoch's metrics; the engine's
    metrics.json holds every epoch, so log the ones the run is missing."""
    if not metrics_json or not Path(metrics_json).is_file():
        return
    epochs = json.loads(Path(metrics_json).read_text()).get("epochs", [])
    logged = run.logged_steps("train/loss")
    for m in epochs:
        if "epoch" in m and int(m["epoch"]) not in logged:
            run.log_metrics(m, step=int(m["epoch"]))
