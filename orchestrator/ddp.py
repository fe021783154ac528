"""A multi-worker (DDP) trial: a Ray Train V2 `TorchTrainer` built inside the Tune function trial.

Every worker calls `ray.train.report` each epoch (rank 0 with the engine's checkpoint), and
`TuneReportCallback` (architecture.md) passes rank 0's metrics on to Tune, so a worker failure
(`FailureConfig`) or a Tune retry resumes from `ray.train.get_checkpoint()`. The trial's config is checked
here, before any worker group starts: a bad one fails in seconds, not after Ray Train's controller waits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.identity import trial_identity
from orchestrator.results import FINAL_KEY, STATUS_KEY, numbers
from orchestrator.resume import drop_engine_checkpoint, restore_train_checkpoint
from orchestrator.trial_callback import TrialBridge, open_trial_run, write_pid
from orchestrator.trials import Trial


def check_before_workers(trial: Trial, workers: int) -> None:
    """Raise the ConfigError a worker would: the config's own checks, then the engine's data checks for
    `workers` ranks (datasets, splits, one full global batch), all before the model or a process exists."""
    import torch

    from hisf.engine.distributed import DistEnv
    from hisf.engine.trial_data import open_trial_data

    trial.config.validate()
    open_trial_data(trial.config, DistEnv(rank=0, world_size=workers, local_rank=0, device=torch.device("cpu"),
                                          owns_group=False))


class TrainReport:
    """Ray Train V2 needs every worker to call `ray.train.report` each time: this engine callback runs on all
    ranks (`all_ranks`), rank 0 attaching the engine's epoch checkpoint; rank 0's metrics reach Tune."""

    all_ranks = True

    def __init__(self, bridge: TrialBridge | None):
        self.bridge = bridge  # rank 0's, which runs first and knows whether Optuna pruned this epoch

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None:
        import ray.train

        ckpt, status = None, "running"
        if self.bridge is not None:
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
            status = "pruned" if self.bridge.pruned else status
        # The engine's folder stays where it is: it is the engine's own resume point on this node.
        ray.train.report({**numbers(metrics), STATUS_KEY: status, FINAL_KEY: False}, checkpoint=ckpt,
                         delete_local_checkpoint_after_upload=False)


def ddp_worker(loop_config: dict) -> None:
    """One Ray Train worker: TorchTrainer has set up the process group; rank 0 tracks to MLflow."""
    import ray.train

    from hisf.config import ConfigError
    from hisf.engine import run_trial
    from orchestrator.devices import place_trial

    trial = Trial.from_payload(loop_config["trial"])
    ctx = RunContext.from_dict(loop_config["ctx"])
    rank = ray.train.get_context().get_world_rank()
    write_pid(trial, f"worker.rank{rank}.pid")
    resumed_epochs = restore_train_checkpoint(trial)
    bridge = run = None
    if rank == 0:
        run = open_trial_run(trial, ctx)
        bridge = TrialBridge(trial, run, ctx, report_to_tune=False)
        # Worker-group starts of this trial, FailureConfig restarts included (hisf.attempts counts Tune's).
        from ray.util.placement_group import get_current_placement_group

        pg = get_current_placement_group()
        run.set_tags({"hisf.train_attempts": int(run.tags().get("hisf.train_attempts", "0")) + 1,
                      "hisf.placement_group": pg.id.hex() if pg is not None else ""})
        if resumed_epochs is not None:
            run.log_metrics({"resumed_from_epoch": resumed_epochs}, step=resumed_epochs)
    callbacks = [bridge, TrainReport(bridge)] if bridge is not None else [TrainReport(None)]
    try:
        final = run_trial(place_trial(trial.config, ctx.gpus_per_trial), callbacks=callbacks, resume=True)
    except ConfigError as e:
        # Raising would make FailureConfig retry what fails the same way each time: every rank returns, and
        # rank 0 leaves the error on the run for the Tune trial (the driver-side process) to act on.
        if run is not None:
            run.fail(str(e))
        return
    if bridge is not None:
        # Rank 0 holds the final metrics and wrote the artifacts on its node: it logs them itself.
        bridge.log_final(final or {})
        run.log_artifacts(bridge.artifacts)
    if not ctx.keep_checkpoints:
        # Each rank drops its node's copy (on other nodes the only place it is). Ray Train's copy stays until
        # the Tune trial has put the trial on record, so a driver killed in between still resumes from it.
        drop_engine_checkpoint(trial.config.output_dir)


def remove_stale_placement_group(run) -> None:
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


def fit_ddp(trial: Trial, ctx: RunContext, run) -> tuple[str, Any]:
    """Check the config, then run the DDP workers; returns the trial's status (finished or pruned) and Ray
    Train's result; raises the ConfigError of the check or of a worker."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from hisf.config import ConfigError

    check_before_workers(trial, ctx.workers_per_trial)
    remove_stale_placement_group(run)
    gpus = ctx.gpus_per_trial
    trainer = TorchTrainer(
        ddp_worker,
        train_loop_config={"trial": trial.payload(), "ctx": ctx.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=ctx.workers_per_trial, use_gpu=gpus > 0,
            resources_per_worker={"CPU": ctx.cpus_per_trial, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            # Same name on a Tune retry or `--resume` of the same trial (stage run and identity): Train V2
            # restores its checkpoint snapshot from storage_path, so get_checkpoint() resumes; a fresh stage,
            # or the same trial id rerun with another identity, starts a fresh run.
            name=f"{trial.trial_id}-ddp-{ctx.parent_run_id[:8]}-{trial_identity(trial.config, ctx).digest[:8]}",
            storage_path=ctx.storage_path,
            failure_config=FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    tags = run.tags()
    if tags.get("hisf.status") == "failed":
        raise ConfigError(tags.get("hisf.error", "a DDP worker reported a bad trial config"))
    return ("pruned" if (result.metrics or {}).get(STATUS_KEY) == "pruned" else "finished"), result
