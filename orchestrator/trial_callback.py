"""The engine callback of a trial: each epoch to MLflow (and Tune), Optuna's pruning decision, and the trial's
MLflow run with the tags that say what it is (stage, row, dataset, seed, identity, Optuna links)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from orchestrator.context import RunContext
from orchestrator.identity import trial_identity
from orchestrator.results import FINAL_KEY, STATUS_KEY, numbers
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
    """The engine callback that forwards epochs to MLflow (and Tune) and asks Optuna whether to prune."""

    def __init__(self, trial: Trial, run: TrialRun, ctx: RunContext, report_to_tune: bool):
        self.trial, self.run, self.ctx = trial, run, ctx
        self.report_to_tune = report_to_tune
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
        if self.report_to_tune:
            from ray import tune

            ckpt = None
            if checkpoint_dir and Path(checkpoint_dir).is_dir():
                ckpt = tune.Checkpoint.from_directory(checkpoint_dir)
                rel = os.path.relpath(checkpoint_dir, self.trial.config.output_dir)
                ckpt.set_metadata({"relpath": rel, "epoch": epoch})
            tune.report({**numbers(metrics), STATUS_KEY: "running", FINAL_KEY: False}, checkpoint=ckpt)
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
