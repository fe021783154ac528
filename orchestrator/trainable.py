"""The Ray Tune function trainable: one trial from its payload to a final result on record.

A one-device trial runs `hisf.engine.run_trial` inside the Tune function; each epoch's metrics go to Tune
and MLflow, and the engine's epoch checkpoint directory is the Tune checkpoint, so a retried trial
(`max_failures`) continues from `tune.get_checkpoint()` (orchestrator/resume.py). A multi-worker trial runs
its DDP workers through orchestrator/ddp.py. A `ConfigError` fails the trial at once: a bad config fails the
same way on every retry. The last report follows the result protocol (orchestrator/results.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path

from orchestrator.context import RunContext
from orchestrator.disk import DISK_FULL_KEY, disk_full
from orchestrator.results import ERROR_KEY, FINAL_KEY, STATUS_KEY, numbers
from orchestrator.resume import drop_engine_checkpoint, drop_ray_checkpoints, restore_tune_checkpoint
from orchestrator.trial_callback import TrialBridge, open_trial_run, remove_pid, write_pid
from orchestrator.trials import Trial


def tune_trainable(config: dict) -> None:
    """The Tune function trainable: config = {"trial": Trial.payload(), "ctx": RunContext.to_dict()}."""
    import ray
    from ray import tune

    from hisf.engine import INPUT_ERRORS

    started = time.perf_counter()
    trial = Trial.from_payload(config["trial"])
    ctx = RunContext.from_dict(config["ctx"])
    run = open_trial_run(trial, ctx)
    resumed_epochs = restore_tune_checkpoint(trial)
    attempt = run.next_attempt()
    run.set_tags({"hisf.node": ray.get_runtime_context().get_node_id(), "hisf.attempts": attempt,
                  "hisf.status": "running"})
    if resumed_epochs is not None:
        run.log_metrics({"resumed_from_epoch": resumed_epochs}, step=attempt)
    write_pid(trial)
    ddp = ctx.workers_per_trial > 1
    bridge = TrialBridge(trial, run, ctx, report_to_tune=not ddp)
    t0 = time.perf_counter()
    try:
        ddp_result = None
        if ddp:
            from orchestrator.ddp import fit_ddp

            status, ddp_result = fit_ddp(trial, ctx, run)
            final = run.latest_metrics()
        else:
            final = run_engine(trial, bridge, ctx.gpus_per_trial)
            status = "pruned" if bridge.pruned else "finished"
    except INPUT_ERRORS as e:
        # Bad input (config, data, backbone, prompt sizes) fails the same way on every retry. Returning (not
        # raising) ends the Tune trial without the max_failures retries.
        message = f"bad trial config (not retried): {e}"
        run.fail(message)
        remove_pid(trial)
        tune.report({STATUS_KEY: "failed", FINAL_KEY: True, ERROR_KEY: message})
        return
    except Exception as e:
        full = disk_full(e, ctx.tracking_uri)
        if full:  # fails every retry alike: reported (not raised, so not retried) and the stage stops
            with contextlib.suppress(Exception):  # the store may sit on the full disk too
                run.fail(full)
            tune.report({STATUS_KEY: "failed", FINAL_KEY: True, ERROR_KEY: full, DISK_FULL_KEY: full})
            return
        run.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    # The engine's own time excludes what our callback spent tracking and reporting inside it.
    engine_seconds = time.perf_counter() - t0 - bridge.track_seconds
    final = numbers(final or bridge.last)
    if not ddp:
        bridge.log_final(final)  # (a DDP trial's rank 0 logged its own)
    run.log_artifacts(bridge.artifacts)
    if attempt > 1:
        backfill_epochs(run, bridge.artifacts.get("metrics"))
    overhead = time.perf_counter() - started - engine_seconds
    run.log_metrics({"orchestration_seconds": overhead, "engine_seconds": engine_seconds}, step=0)
    run.finish(status)
    remove_pid(trial)
    if not ctx.keep_checkpoints:
        # On record as finished: its checkpoints only served resuming it (Tune's copy goes on the driver).
        drop_engine_checkpoint(trial.config.output_dir)
        if ddp_result is not None:
            drop_ray_checkpoints(ddp_result.filesystem, ddp_result.path, ctx.storage_path)
    tune.report({**final, STATUS_KEY: status, FINAL_KEY: True, "engine_seconds": engine_seconds,
                 "orchestration_seconds": overhead})


def run_engine(trial: Trial, bridge: TrialBridge, gpus: float) -> dict:
    from hisf.engine import StopTrial, run_trial
    from orchestrator.devices import place_trial

    try:
        # The device follows the trial's resources (orchestrator/devices.py), not what this process sees.
        return run_trial(place_trial(trial.config, gpus), callbacks=[bridge], resume=True)
    except StopTrial:
        if not bridge.pruned:
            raise
        return dict(bridge.last)


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
