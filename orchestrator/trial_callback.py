"""The engine callbacks of a Tune trial: per member, each epoch to MLflow and Optuna's pruning decision, and the
member's MLflow run with the tags that say what it is (stage, row, dataset, seed, identity, Optuna links); per
group, one Tune report per epoch with one checkpoint holding every member's (docs/fusion.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.identity import trial_identity
from orchestrator.paths import remove_tree
from orchestrator.results import epoch_report, numbers
from orchestrator.tracking import TrialRun
from orchestrator.trials import Trial


def trial_tags(trial: Trial, ctx: RunContext) -> dict[str, Any]:
    cfg = trial.config
    tags = {
        "hisf.spec": ctx.spec_name, "hisf.stage": trial.stage,
        "hisf.row": trial.row, "hisf.dataset": trial.dataset, "hisf.method": cfg.method.name,
        "hisf.seed": trial.seed, "hisf.depth": cfg.method.depth, "hisf.protocol": cfg.protocol,
        "hisf.git_commit": ctx.git_commit,
        # hisf.identity plus its parts (config, hisf.spec_hash, data, code): what `--resume` compares.
        **trial_identity(cfg, ctx).tags(),
    }
    if ctx.search_run_id:
        tags["hisf.search_run"] = ctx.search_run_id  # the search launch whose best values this trial took
    if trial.study is not None:
        tags.update({"optuna.study": trial.study, "optuna.trial_number": trial.optuna_number,
                     "optuna.storage": ctx.optuna_storage_display})
    return tags


def tracked_params(trial: Trial) -> dict[str, Any]:
    """The run's params: the trial config's leaves, of the `method.*` ones only those its method reads
    (hisf/model/facts.py), so the MLflow compare view's differences are real ones; a key the spec's grid or
    search sets is always kept (reports find a run's grid point by it)."""
    from hisf.model.facts import METHODS

    reads = {f"method.{k}" for k in ("name", *METHODS[trial.config.method.name].reads)} | {k for k, _ in trial.point}
    return {k: v for k, v in trial.config.flatten().items() if not k.startswith("method.") or k in reads}


def open_trial_run(trial: Trial, ctx: RunContext) -> TrialRun:
    """The trial's MLflow run in the stage's parent run: continued when this trial (same identity) has one."""
    return TrialRun(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial.trial_id, trial_tags(trial, ctx),
                    tracked_params(trial), run_name=trial.run_name)


def write_pid(trial: Trial, name: str = "worker.pid") -> None:
    """Lets an operator (or the fault-injection tests) find the process that runs this trial."""
    Path(trial.config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(trial.config.output_dir) / name).write_text(str(os.getpid()))


def remove_pid(trial: Trial, name: str = "worker.pid") -> None:
    """The trial ended by itself (on record): no process runs it any more."""
    (Path(trial.config.output_dir) / name).unlink(missing_ok=True)


class TrialBridge:
    """The engine callback of one member: forwards its epochs to MLflow and asks Optuna whether to prune."""

    def __init__(self, trial: Trial, run: TrialRun, ctx: RunContext):
        self.trial, self.run, self.ctx = trial, run, ctx
        self.pruned = False
        self.artifacts: dict[str, str] = {}
        self.last: dict[str, Any] = {}
        self.track_seconds = 0.0
        self._optuna_trial = None
        if trial.study is not None:
            from orchestrator.search import open_trial

            self._optuna_trial = open_trial(ctx.optuna_storage, trial.study, trial.optuna_trial_id,
                                            ctx.pruner, ctx.startup_trials)
            # Cross-links: the study's trial names its MLflow run, the run carries optuna.* tags.
            self._optuna_trial.set_user_attr("mlflow_run_id", run.run_id)
            self._optuna_trial.set_user_attr("hisf_trial_id", trial.trial_id)
            if ctx.pruner == "none":
                self._optuna_trial = None

    def on_trial_start(self, data: dict) -> None:
        from orchestrator.environment import environment_tags

        # How the dataset's images were built (exact: CoOp's pixels; fast: re-encoded copies), and where the trial
        # runs: versions, devices, and the precision and compile mode that actually run (after any fallback).
        self.run.set_tags({"hisf.image_mode": data["image_mode"],
                           **environment_tags(data["precision"], data["compile"], data.get("device_name"))})

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None:
        t0 = time.perf_counter()
        self.last = dict(metrics)
        self.run.log_metrics(metrics, step=epoch)
        metric, stop = self.ctx.metric, False
        if self._optuna_trial is not None and metric in metrics:
            self._optuna_trial.report(float(metrics[metric]), epoch)
            stop = self._optuna_trial.should_prune()
        self.track_seconds += time.perf_counter() - t0
        if stop:
            from hisf.engine import StopTrial

            self.pruned = True
            raise StopTrial(f"pruned by Optuna at epoch {epoch}: {metric}={metrics[metric]}")

    def on_progress(self, step: int, total: int, metrics: dict) -> None:
        pass

    def on_trial_end(self, metrics: dict, artifacts: dict) -> None:
        self.artifacts = dict(artifacts)

    def log_final(self, final: dict) -> None:
        """Epoch metrics are already logged per step: log only what the final evaluation adds or changes."""
        last = numbers(self.last)
        self.run.log_metrics({k: v for k, v in numbers(final).items() if last.get(k) != v},
                             step=int(final.get("epoch", 0)))


def group_staging(ctx: RunContext, group_id: str) -> Path:
    """Where a group stages the checkpoint it reports to Tune (inside the stage's trial folders, which it owns)."""
    return Path(ctx.runs_root) / "groups" / group_id


class TuneGroupReport:
    """A GroupCallback: one `tune.report` per epoch boundary for the whole group, with one checkpoint holding each
    member that finished that epoch under its trial id (hard links to its engine checkpoint, staged in the group's
    folder and removed once Tune has persisted them), so a retried group restores every member."""

    def __init__(self, member_ids: list[str], ctx: RunContext, group_id: str):
        self.ids, self.ctx, self.staging = member_ids, ctx, group_staging(ctx, group_id)
        self.track_seconds = 0.0

    def on_epoch_end(self, records: list[dict]) -> None:
        from ray import tune

        t0 = time.perf_counter()
        remove_tree(self.staging, self.ctx.runs_root, "group checkpoint staging")
        epochs = {}
        for rec in records:
            tid, src = self.ids[rec["member"]], Path(rec["checkpoint_dir"])
            if not src.is_dir():
                continue
            dest = self.staging / tid
            dest.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and not f.name.startswith("."):
                    _link_or_copy(f, dest / f.name)
            epochs[tid] = int(rec["epoch"])
        ckpt = None
        if epochs:
            ckpt = tune.Checkpoint.from_directory(str(self.staging))
            ckpt.set_metadata({"epochs": epochs})
        tune.report(epoch_report(records), checkpoint=ckpt)
        remove_tree(self.staging, self.ctx.runs_root, "group checkpoint staging")
        self.track_seconds += time.perf_counter() - t0


def _link_or_copy(src: Path, dest: Path) -> None:
    import shutil

    try:
        os.link(src, dest)  # same file system: no bytes copied here (Tune copies them into its storage)
    except OSError:
        shutil.copyfile(src, dest)
