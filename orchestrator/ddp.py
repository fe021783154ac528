"""A multi-worker (DDP) group: a Ray Train V2 `TorchTrainer` built inside the Tune function trial, every rank holding
every member of the group (docs/fusion.md; one member: a trial alone).

Every worker calls `ray.train.report` each epoch boundary (rank 0 with one checkpoint holding each member's), and
`TuneReportCallback` (architecture.md) passes rank 0's report on to Tune, so a worker failure (`FailureConfig`) or a
Tune retry resumes every member from `ray.train.get_checkpoint()`. Rank 0 keeps each member's MLflow run and Optuna
pruning and puts each member's outcome on its run, where the Tune trial reads it back. The members' configs are
checked here, before any worker group starts: a bad one fails in seconds, not after Ray Train's controller waits.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.context import RunContext
from orchestrator.groups import TrialGroup
from orchestrator.identity import trial_identity
from orchestrator.paths import remove_tree
from orchestrator.results import epoch_report
from orchestrator.resume import drop_engine_checkpoint, restore_train_checkpoint
from orchestrator.trial_callback import TrialBridge, _link_or_copy, group_staging, open_trial_run, write_pid
from orchestrator.trials import Trial

OUTCOME_TAG = "hisf.ddp_outcome"  # rank 0's word on a member: finished | pruned (failures: hisf.status=failed)


def check_before_workers(trial: Trial, workers: int) -> None:
    """Raise the ConfigError a worker would: the config's own checks, then the engine's data checks for
    `workers` ranks (datasets, splits, one full global batch), all before the model or a process exists."""
    import torch

    from hisf.engine.distributed import DistEnv
    from hisf.engine.trial_data import open_trial_data

    trial.config.validate()
    open_trial_data(trial.config, DistEnv(rank=0, world_size=workers, local_rank=0, device=torch.device("cpu"),
                                          owns_group=False))


class TrainGroupReport:
    """Ray Train V2 needs every worker to call `ray.train.report` each time: this GroupCallback runs on all ranks
    (`all_ranks`), rank 0 attaching one checkpoint with each member that finished the epoch under its trial id."""

    all_ranks = True

    def __init__(self, member_ids: list[str], ctx: RunContext, group_id: str, is_main: bool):
        self.ids, self.ctx, self.is_main = member_ids, ctx, is_main
        self.staging = group_staging(ctx, group_id)

    def on_epoch_end(self, records: list[dict]) -> None:
        import ray.train

        ckpt = None
        if self.is_main:
            remove_tree(self.staging, self.ctx.runs_root, "group checkpoint staging")
            epochs = {}
            for rec in records:
                tid, src = self.ids[rec["member"]], Path(rec["checkpoint_dir"])
                if src.is_dir():
                    (self.staging / tid).mkdir(parents=True, exist_ok=True)
                    for f in src.iterdir():
                        if f.is_file() and not f.name.startswith("."):
                            _link_or_copy(f, self.staging / tid / f.name)
                    epochs[tid] = int(rec["epoch"])
            if epochs:
                ckpt = ray.train.Checkpoint.from_directory(str(self.staging))
                ckpt.set_metadata({"epochs": epochs})
        # The engine's folders stay where they are: each is its member's own resume point on this node.
        ray.train.report(epoch_report(records), checkpoint=ckpt, delete_local_checkpoint_after_upload=False)
        if self.is_main:
            remove_tree(self.staging, self.ctx.runs_root, "group checkpoint staging")


def ddp_worker(loop_config: dict) -> None:
    """One Ray Train worker: TorchTrainer has set up the process group; rank 0 tracks every member to MLflow."""
    import ray.train

    from hisf.engine import INPUT_ERRORS, run_group
    from orchestrator.devices import place_trial

    group = TrialGroup.from_payload(loop_config["group"])
    ctx = RunContext.from_dict(loop_config["ctx"])
    rank = ray.train.get_context().get_world_rank()
    for t in group.members:
        write_pid(t, f"worker.rank{rank}.pid")
    restored = restore_train_checkpoint(group)
    runs, bridges = [], []
    if rank == 0:
        from ray.util.placement_group import get_current_placement_group

        pg = get_current_placement_group()
        for t in group.members:
            run = open_trial_run(t, ctx)
            # Worker-group starts of this trial, FailureConfig restarts included (hisf.attempts counts Tune's).
            run.set_tags({"hisf.train_attempts": int(run.tags().get("hisf.train_attempts", "0")) + 1,
                          "hisf.placement_group": pg.id.hex() if pg is not None else ""})
            if t.trial_id in restored:
                run.log_metrics({"resumed_from_epoch": restored[t.trial_id]}, step=restored[t.trial_id])
            runs.append(run)
            bridges.append(TrialBridge(t, run, ctx))
    callbacks = [[b] for b in bridges] if rank == 0 else [[] for _ in group.members]
    report = TrainGroupReport([t.trial_id for t in group.members], ctx, group.group_id, rank == 0)
    try:
        outcomes = run_group([place_trial(t.config, ctx.gpus_per_trial) for t in group.members], callbacks,
                             resume=True, group_callbacks=[report])
    except INPUT_ERRORS as e:
        # Raising would make FailureConfig retry what fails the same way each time: every rank returns, and
        # rank 0 leaves the error on each member's run for the Tune trial (the driver-side process) to act on.
        for run in runs:
            run.fail(str(e))
        return
    for run, bridge, outcome in zip(runs, bridges, outcomes):
        # Rank 0 holds the final metrics and wrote the artifacts on its node: it logs them itself.
        if isinstance(outcome, BaseException):
            run.fail(f"{type(outcome).__name__}: {outcome}")
            continue
        bridge.log_final(outcome or {})
        run.log_artifacts(bridge.artifacts)
        run.set_tags({OUTCOME_TAG: "pruned" if bridge.pruned else "finished"})
    if not ctx.keep_checkpoints:
        # Each rank drops its node's copy (on other nodes the only place it is). Ray Train's copy stays until
        # the Tune trial has put the members on record, so a driver killed in between still resumes from it.
        for t in group.members:
            drop_engine_checkpoint(t.config.output_dir)


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


def fit_ddp(group: TrialGroup, members: list[Trial], ctx: RunContext, runs: list) -> list:
    """Check each member's config, then run the DDP workers over the members; returns, per member, a dict (its
    final metrics, `pruned` when Optuna stopped it) or its error, as rank 0 put them on its run. Raises the
    ConfigError of the check (a bad config fails every member the same way)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    for t in members:
        check_before_workers(t, ctx.workers_per_trial)
    for run in runs:
        remove_stale_placement_group(run)
    ddp_group = TrialGroup(tuple(members))
    digest = "".join(trial_identity(t.config, ctx).digest[:8] for t in members)[:16]
    gpus = ctx.gpus_per_trial
    trainer = TorchTrainer(
        ddp_worker,
        train_loop_config={"group": ddp_group.payload(), "ctx": ctx.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=ctx.workers_per_trial, use_gpu=gpus > 0,
            resources_per_worker={"CPU": ctx.cpus_per_trial, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            # Same name on a Tune retry or `--resume` of the same members (stage run and identities): Train V2
            # restores its checkpoint snapshot from storage_path, so get_checkpoint() resumes; a fresh stage, or
            # the same members rerun with another identity, starts a fresh run.
            name=f"{group.group_id}-ddp-{ctx.parent_run_id[:8]}-{digest}",
            storage_path=ctx.storage_path,
            failure_config=FailureConfig(max_failures=ctx.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    outcomes = []
    for run in runs:
        tags = run.tags()
        if tags.get("hisf.status") == "failed":
            outcomes.append(RuntimeError(tags.get("hisf.error", "a DDP worker reported a bad trial config")))
        else:
            outcomes.append({**run.latest_metrics(), "pruned": tags.get(OUTCOME_TAG) == "pruned"})
    if not ctx.keep_checkpoints and all(isinstance(o, dict) for o in outcomes):
        from orchestrator.resume import drop_ray_checkpoints

        drop_ray_checkpoints(result.filesystem, result.path, ctx.storage_path)
    return outcomes
