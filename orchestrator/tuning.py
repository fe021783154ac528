"""Ray Tune: the function trainable that runs one trial (engine directly, or DDP through TorchTrainer) and the Tuner.

A one-device trial runs `hisf.engine.run_trial` inside the Tune function; each epoch's metrics go to Tune
and MLflow, and the engine's epoch checkpoint directory is the Tune checkpoint, so a retried trial
(`max_failures`) continues from `tune.get_checkpoint()`. A multi-worker trial builds a Ray Train V2
`TorchTrainer` inside the same function with `TuneReportCallback` (architecture.md): every worker calls
`ray.train.report` each epoch (rank 0 with the engine's checkpoint), so Tune gets per-epoch metrics and a
worker failure, or a Tune retry, resumes from `ray.train.get_checkpoint()`. A `ConfigError` fails the trial
at once: a bad config fails the same way on every retry.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from orchestrator.trials import Trial

# Keys of the Tune result that are ours (the rest are the engine's metric names).
STATUS_KEY = "hisf_status"
FINAL_KEY = "hisf_final"
ERROR_KEY = "hisf_error"


class _Bridge:
    """The engine callback that forwards epochs to Tune + MLflow and asks Optuna whether to prune."""

    def __init__(self, trial: Trial, run, ctx: Mapping[str, Any], report_to_tune: bool):
        self.trial, self.run, self.ctx = trial, run, ctx
        self.report_to_tune = report_to_tune
        self.pruned = False
        self.artifacts: dict[str, str] = {}
        self.last: dict[str, Any] = {}
        self.track_seconds = 0.0
        self._optuna_trial = None
        if trial.study is not None:
            from orchestrator.search import open_trial

            self._optuna_trial = open_trial(ctx["optuna_storage"], trial.study, trial.optuna_trial_id,
                                            ctx.get("pruner", "none"), ctx.get("startup_trials", 5))
            # Cross-links: the study's trial names its MLflow run, the run carries optuna.* tags.
            self._optuna_trial.set_user_attr("mlflow_run_id", run.run_id)
            self._optuna_trial.set_user_attr("hisf_trial_id", trial.trial_id)
            if ctx.get("pruner", "none") == "none":
                self._optuna_trial = None

    def on_trial_start(self, data: dict) -> None:
        # How the dataset's images were built (exact: CoOp's pixels; fast: re-encoded copies).
        self.run.set_tags({"hisf.image_mode": data["image_mode"]})

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None:
        t0 = time.perf_counter()
        self.last = dict(metrics)
        self.run.log_metrics(metrics, step=epoch)
        stop = False
        if self._optuna_trial is not None and self.ctx["metric"] in metrics:
            self._optuna_trial.report(float(metrics[self.ctx["metric"]]), epoch)
            stop = self._optuna_trial.should_prune()
        if self.report_to_tune:
            from ray import tune

            ckpt = None
            if checkpoint_dir and Path(checkpoint_dir).is_dir():
                ckpt = tune.Checkpoint.from_directory(checkpoint_dir)
                rel = os.path.relpath(checkpoint_dir, self.trial.config.output_dir)
                ckpt.set_metadata({"relpath": rel, "epoch": epoch})
            tune.report({**_numbers(metrics), STATUS_KEY: "running", FINAL_KEY: False}, checkpoint=ckpt)
        self.track_seconds += time.perf_counter() - t0
        if stop:
            from hisf.engine import StopTrial

            self.pruned = True
            raise StopTrial(f"pruned by Optuna at epoch {epoch}: {self.ctx['metric']}={metrics[self.ctx['metric']]}")

    def on_progress(self, step: int, total: int, metrics: dict) -> None:
        pass

    def on_trial_end(self, metrics: dict, artifacts: dict) -> None:
        self.artifacts = dict(artifacts)


def trial_tags(trial: Trial, ctx: Mapping[str, Any]) -> dict[str, Any]:
    cfg = trial.config
    tags = {
        "hisf.spec": ctx["spec_name"], "hisf.spec_hash": ctx["spec_hash"], "hisf.stage": trial.stage,
        "hisf.row": trial.row, "hisf.dataset": trial.dataset, "hisf.method": cfg.method.name,
        "hisf.seed": trial.seed, "hisf.depth": cfg.method.depth, "hisf.protocol": cfg.protocol,
        "hisf.git_commit": ctx["git_commit"],
    }
    if trial.study is not None:
        tags.update({"optuna.study": trial.study, "optuna.trial_number": trial.optuna_number,
                     "optuna.storage": ctx.get("optuna_storage_display", "")})
    return tags


def _restore_checkpoint(trial: Trial) -> int | None:
    """Put Tune's last checkpoint where the engine looks, when this node's output folder lacks it.

    Returns the number of epochs the checkpoint holds (None on a first attempt).
    """
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    meta = ckpt.get_metadata() or {}
    rel = meta.get("relpath")
    if rel:
        dest = Path(trial.config.output_dir) / rel
        if not dest.is_dir():
            with ckpt.as_directory() as src:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src, dest)
    return int(meta.get("epoch", -1)) + 1


def tune_trainable(config: dict) -> None:
    """The Tune function trainable: config = {"trial": Trial.payload(), "ctx": run context}."""
    from ray import tune

    from orchestrator.tracking import TrialRun

    started = time.perf_counter()
    trial = Trial.from_payload(config["trial"])
    ctx = config["ctx"]
    import ray

    run = TrialRun(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial.trial_id,
                   trial_tags(trial, ctx), trial.config.flatten(), run_name=trial.run_name)
    resumed_epochs = _restore_checkpoint(trial)
    attempt = run.next_attempt()
    run.set_tags({"hisf.node": ray.get_runtime_context().get_node_id(), "hisf.attempts": attempt,
                  "hisf.status": "running"})
    if resumed_epochs is not None:
        run.log_metrics({"resumed_from_epoch": resumed_epochs}, step=attempt)
    Path(trial.config.output_dir).mkdir(parents=True, exist_ok=True)
    # Lets an operator (or the fault-injection test) find the process that runs this trial.
    (Path(trial.config.output_dir) / "worker.pid").write_text(str(os.getpid()))
    workers = int(ctx.get("workers_per_trial", 1))
    bridge = _Bridge(trial, run, ctx, report_to_tune=workers == 1)
    t0 = time.perf_counter()
    from hisf.config import ConfigError

    try:
        ddp_result = None
        if workers > 1:
            status, ddp_result = _fit_ddp(trial, ctx, config, run)
            final = run.latest_metrics()
        else:
            final = _run_engine(trial, bridge, float(ctx.get("gpus_per_trial", 0)))
            status = "pruned" if bridge.pruned else "finished"
    except ConfigError as e:
        # Returning (not raising) ends the Tune trial without the max_failures retries.
        message = f"bad trial config (not retried): {e}"
        run.fail(message)
        tune.report({STATUS_KEY: "failed", FINAL_KEY: True, ERROR_KEY: message})
        return
    except Exception as e:
        run.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    # The engine's own time excludes what our callback spent tracking and reporting inside it.
    engine_seconds = time.perf_counter() - t0 - bridge.track_seconds
    final = _numbers(final or bridge.last)
    if workers == 1:
        # Epoch metrics are already logged per step; log only what the final evaluation adds or changes.
        # (A DDP trial's rank 0 logged its own.)
        last = _numbers(bridge.last)
        run.log_metrics({k: v for k, v in final.items() if last.get(k) != v}, step=int(final.get("epoch", 0)))
    run.log_artifacts(bridge.artifacts)
    if attempt > 1:
        _backfill_epochs(run, bridge.artifacts.get("metrics"))
    overhead = time.perf_counter() - started - engine_seconds
    run.log_metrics({"orchestration_seconds": overhead, "engine_seconds": engine_seconds}, step=0)
    run.finish(status)
    if not ctx.get("keep_checkpoints", False):
        # On record as finished: its checkpoints only served resuming it (Tune's copy goes on the driver).
        from orchestrator.checkpoints import drop_engine_checkpoint, drop_ray_checkpoints

        drop_engine_checkpoint(trial.config.output_dir)
        if ddp_result is not None:
            drop_ray_checkpoints(ddp_result.filesystem, ddp_result.path)
    tune.report({**final, STATUS_KEY: status, FINAL_KEY: True, "engine_seconds": engine_seconds,
                 "orchestration_seconds": overhead})


def _backfill_epochs(run, metrics_json: str | None) -> None:
    """A kill between the engine's checkpoint and our epoch log loses that epoch's metrics; the engine's
    metrics.json holds every epoch, so log the ones the run is missing."""
    import json

    if not metrics_json or not Path(metrics_json).is_file():
        return
    epochs = json.loads(Path(metrics_json).read_text()).get("epochs", [])
    logged = run.logged_steps("train/loss")
    for m in epochs:
        if "epoch" in m and int(m["epoch"]) not in logged:
            run.log_metrics(m, step=int(m["epoch"]))


def _run_engine(trial: Trial, bridge: _Bridge, gpus: float) -> dict:
    from hisf.engine import StopTrial, run_trial
    from orchestrator.devices import place_trial

    try:
        # The device follows the trial's resources (orchestrator/devices.py), not what this process sees.
        return run_trial(place_trial(trial.config, gpus), callbacks=[bridge], resume=True)
    except StopTrial:
        if not bridge.pruned:
            raise
        return dict(bridge.last)


class _TrainReport:
    """Ray Train V2 needs every worker to call `ray.train.report` each time: this engine callback runs on all
    ranks (`all_ranks`), rank 0 attaching the engine's epoch checkpoint; rank 0's metrics reach Tune."""

    all_ranks = True

    def __init__(self, bridge: _Bridge | None):
        self.bridge = bridge  # rank 0's, which runs first and knows whether Optuna pruned this epoch

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None:
        import ray.train

        ckpt, status = None, "running"
        if self.bridge is not None:
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
            status = "pruned" if self.bridge.pruned else status
        # The engine's folder stays where it is: it is the engine's own resume point on this node.
        ray.train.report({**_numbers(metrics), STATUS_KEY: status, FINAL_KEY: False}, checkpoint=ckpt,
                         delete_local_checkpoint_after_upload=False)


def _restore_train_checkpoint(trial: Trial) -> int | None:
    """Copy Ray Train's latest checkpoint into this node's engine checkpoint folder (every rank: without
    shared storage, other nodes' folders are empty or stale) and return the epochs it holds.

    Ray's copy wins over a newer local one, and with none a local one is dropped, so that all ranks start
    from the same epoch (a node without shared storage has no local copy to agree with).
    """
    import ray.train
    import torch

    from hisf.engine.checkpoint import checkpoint_path

    ckpt = ray.train.get_checkpoint()
    dest = checkpoint_path(trial.config.output_dir)
    if ckpt is None:
        dest.unlink(missing_ok=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as src:
        for f in sorted(Path(src).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                # Ranks on one node may copy the same file at once: each renames its own whole copy into place.
                tmp = dest.parent / f".{f.name}.{os.getpid()}.restore"
                shutil.copyfile(f, tmp)
                os.replace(tmp, dest.parent / f.name)
    return int(torch.load(dest, map_location="cpu", weights_only=True)["epoch"]) if dest.is_file() else None


def _ddp_worker(loop_config: dict) -> None:
    """One Ray Train worker: TorchTrainer has set up the process group; rank 0 tracks to MLflow."""
    import ray.train

    from hisf.config import ConfigError
    from hisf.engine import run_trial
    from orchestrator.tracking import TrialRun

    trial = Trial.from_payload(loop_config["trial"])
    ctx = loop_config["ctx"]
    rank = ray.train.get_context().get_world_rank()
    Path(trial.config.output_dir).mkdir(parents=True, exist_ok=True)
    # Lets an operator (or the fault-injection test) find each DDP worker's process.
    (Path(trial.config.output_dir) / f"worker.rank{rank}.pid").write_text(str(os.getpid()))
    resumed_epochs = _restore_train_checkpoint(trial)
    bridge = run = None
    if rank == 0:
        run = TrialRun(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"], trial.trial_id,
                       trial_tags(trial, ctx), trial.config.flatten(), run_name=trial.run_name)
        bridge = _Bridge(trial, run, ctx, report_to_tune=False)
        # Worker-group starts of this trial, FailureConfig restarts included (hisf.attempts counts Tune's).
        from ray.util.placement_group import get_current_placement_group

        pg = get_current_placement_group()
        run.set_tags({"hisf.train_attempts": int(run.tags().get("hisf.train_attempts", "0")) + 1,
                      "hisf.placement_group": pg.id.hex() if pg is not None else ""})
        if resumed_epochs is not None:
            run.log_metrics({"resumed_from_epoch": resumed_epochs}, step=resumed_epochs)
    callbacks = [bridge, _TrainReport(bridge)] if bridge is not None else [_TrainReport(None)]
    from orchestrator.devices import place_trial

    try:
        final = run_trial(place_trial(trial.config, float(ctx.get("gpus_per_trial", 0))), callbacks=callbacks,
                          resume=True)
    except ConfigError as e:
        # Raising would make FailureConfig retry what fails the same way each time: every rank returns, and
        # rank 0 leaves the error on the run for tune_trainable (the driver-side process) to act on.
        if run is not None:
            run.fail(str(e))
        return
    if bridge is not None:
        # Rank 0 holds the final metrics and wrote the artifacts on its node: it logs them itself.
        last = _numbers(bridge.last)
        run.log_metrics({k: v for k, v in _numbers(final or {}).items() if last.get(k) != v},
                        step=int((final or {}).get("epoch", 0)))
        run.log_artifacts(bridge.artifacts)
    if not ctx.get("keep_checkpoints", False):
        # Each rank drops its node's copy (on other nodes the only place it is). Ray Train's copy stays until
        # tune_trainable has put the trial on record, so a driver killed in between still resumes from it.
        from orchestrator.checkpoints import drop_engine_checkpoint

        drop_engine_checkpoint(trial.config.output_dir)


def _remove_stale_placement_group(run) -> None:
    """Free the workers' placement group a dead earlier attempt of this trial left behind.

    When the Tune trial's process dies, its TorchTrainer controller dies with it; Ray Train's detached
    PlacementGroupCleaner then asks the State API, which needs the dashboard (not running in the embedded
    local cluster), so the group and its CPUs/GPUs stay reserved and the retry could never start its workers.
    Only this trial's previous attempt used that group, and that attempt is over once Tune retries.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg_hex = run.tags().get("hisf.placement_group")
    if not pg_hex:
        return
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    try:
        state = placement_group_table(pg).get("state")
    except Exception:  # an id from an earlier Ray cluster (`--resume` after a restart): nothing to free
        return
    if state not in (None, "REMOVED"):
        remove_placement_group(pg)


def _fit_ddp(trial: Trial, ctx: Mapping[str, Any], config: dict, run) -> tuple[str, Any]:
    """Run the DDP workers; returns the trial's status (finished or pruned) and Ray Train's result; raises a
    worker's ConfigError."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from hisf.config import ConfigError

    _remove_stale_placement_group(run)
    gpus = float(ctx.get("gpus_per_trial", 0))
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=int(ctx["workers_per_trial"]), use_gpu=gpus > 0,
            resources_per_worker={"CPU": float(ctx.get("cpus_per_trial", 1)), **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            # Same name on a Tune retry or `--resume` (same stage run): Train V2 restores its checkpoint
            # snapshot from storage_path, so get_checkpoint() resumes; a fresh stage starts a fresh run.
            name=f"{trial.trial_id}-ddp-{ctx['parent_run_id'][:8]}", storage_path=ctx["storage_path"],
            failure_config=FailureConfig(max_failures=int(ctx.get("max_failures", 0))),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    tags = run.tags()
    if tags.get("hisf.status") == "failed":
        raise ConfigError(tags.get("hisf.error", "a DDP worker reported a bad trial config"))
    return ("pruned" if (result.metrics or {}).get(STATUS_KEY) == "pruned" else "finished"), result


def _numbers(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
