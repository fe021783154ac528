"""Resume on the orchestrator side, end to end: which recorded trials are reused, which rerun and why, which
folders start fresh, what a retried trial restores, and which training checkpoints go once a trial is on record.

Reuse: `--resume` continues a stage's latest launch (MLflow parent run). A trial whose run there finished
(or was pruned) with the same identity (orchestrator/identity.py: config, spec hash, data build, code) is
reused; an unfinished run with the same identity is continued in its folder, where the engine resumes its
last epoch; a trial whose runs there have another identity reruns in a fresh folder and a new run, and the
old runs are tagged `hisf.stale` with the reason (reports leave them out); a trial with no run there starts
in a fresh folder. Without `--resume` every trial folder of the stage starts fresh.

Restore: a retried one-device trial copies Tune's last checkpoint into its folder when this node lacks it;
each DDP rank copies Ray Train's.

Drop: a finished trial's last training checkpoint exists twice, the engine's `output_dir/checkpoint/` and
Tune's (or Ray Train's) copy under `ray_results/`; for ViT-B/16 HISF each is ~112 MB, which a large grid
multiplies into terabytes. Both only serve resuming an unfinished trial, so once its MLflow run says finished
(or pruned) the trial drops the engine's folder and its Ray Train copy (DDP), and the driver drops Tune's copy
when Tune reports the trial complete (`keep_checkpoints: true` keeps them). Failed and interrupted trials keep
everything: `--resume` and Tune's retries continue from them. Every deletion goes through orchestrator.paths.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ray.tune import Callback

from orchestrator.identity import PART_NAMES, differences, trial_identity
from orchestrator.paths import remove_remote_tree, remove_tree
from orchestrator.results import DONE, STATUS_KEY, member_results
from orchestrator.trials import Trial

STALE_TAG = "hisf.stale"


# ---- which recorded trials are reused -----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What `--resume` does with one trial: `reuse` its finished run, `continue` its unfinished one, run it
    as `new` (no run yet), or `rerun` it fresh because its runs are of another identity (`reasons`)."""

    trial: Trial
    kind: str
    run: Any = None
    reasons: tuple[tuple[str, str], ...] = ()
    stale: tuple[Any, ...] = ()


@dataclass
class ResumePlan:
    decisions: list[Decision] = field(default_factory=list)

    @property
    def reused(self) -> dict[str, Any]:
        return {d.trial.trial_id: d.run for d in self.decisions if d.kind == "reuse"}

    @property
    def todo(self) -> list[Trial]:
        return [d.trial for d in self.decisions if d.kind != "reuse"]

    @property
    def rerun(self) -> list[Decision]:
        return [d for d in self.decisions if d.kind == "rerun"]

    def why_rerun(self) -> str:
        """`2 rerun as not the same trial: config differs for 2 (method.lambda_le ...), spec hash for 4`."""
        if not self.rerun:
            return ""
        parts: dict[str, list[str]] = {}
        for d in self.rerun:
            for part, detail in d.reasons:
                parts.setdefault(part, []).append(detail)
        said = "; ".join(f"{PART_NAMES.get(p, p)} differs for {len(v)} ({v[0]}{', ...' if len(v) > 1 else ''})"
                         for p, v in parts.items())
        return f"{len(self.rerun)} recorded trial(s) rerun as not the same trial now: {said}"


class LaunchRuns:
    """The trial runs of one stage launch, by trial id, judged against the identity of the trials now."""

    def __init__(self, runs: Iterable[Any], ctx, tracker=None):
        self.ctx, self.tracker = ctx, tracker
        self.by_trial: dict[str, list[Any]] = {}
        for r in sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True):  # newest first
            tid = r.data.tags.get("hisf.trial_id")
            if tid and STALE_TAG not in r.data.tags:
                self.by_trial.setdefault(tid, []).append(r)

    @classmethod
    def read(cls, tracker, parent_run_id: str, ctx) -> "LaunchRuns":
        return cls(tracker.children(parent_run_id), ctx, tracker)

    def decide(self, trial: Trial) -> Decision:
        runs = self.by_trial.get(trial.trial_id, [])
        if not runs:
            return Decision(trial, "new")
        now = trial_identity(trial.config, self.ctx)
        judged = [(r, differences(now, trial.config, r.data.tags, r.data.params)) for r in runs]
        same = [r for r, diff in judged if not diff]
        stale = tuple(r for r, diff in judged if diff)
        done = [r for r in same if r.data.tags.get("hisf.status") in DONE]
        if done:
            return Decision(trial, "reuse", done[0], stale=stale)
        if same:
            return Decision(trial, "continue", same[0], stale=stale)
        return Decision(trial, "rerun", reasons=tuple(judged[0][1]), stale=stale)

    def plan(self, trials: Iterable[Trial]) -> ResumePlan:
        return ResumePlan([self.decide(t) for t in trials])

    def done(self) -> list[Any]:
        """The newest finished (or pruned) run of each trial of the launch, whatever its identity."""
        return [next(r for r in runs if r.data.tags.get("hisf.status") in DONE)
                for runs in self.by_trial.values() if any(r.data.tags.get("hisf.status") in DONE for r in runs)]

    def settle(self, decision: Decision) -> None:
        """A trial with no run of its identity in the launch (`new`, `rerun`) starts in a fresh folder: what is
        there is not its own (a trial's run exists before it writes a checkpoint). A rerun's old runs are
        marked stale (reports and `status` leave them out)."""
        if decision.kind not in ("new", "rerun"):
            return
        clear_trial_folder(decision.trial, self.ctx.runs_root)
        if self.tracker is not None:
            why = "; ".join(f"{PART_NAMES.get(p, p)}: {d}" for p, d in decision.reasons)
            for r in decision.stale:
                self.tracker.set_tags(r.info.run_id, {STALE_TAG: f"rerun as not the same trial: {why}"[:4000]})


def plan_stage(trials: list[Trial], tracker, parent_run_id: str, ctx, resume: bool) -> ResumePlan:
    """Which trials of a fixed list (sweep, final) run now. A fresh stage runs them all in fresh folders;
    `--resume` reuses the same trials finished in the launch, and reruns in fresh folders those whose runs
    there are of another identity."""
    if not resume:
        for t in trials:
            clear_trial_folder(t, ctx.runs_root)
        return ResumePlan([Decision(t, "new") for t in trials])
    runs = LaunchRuns.read(tracker, parent_run_id, ctx)
    plan = runs.plan(trials)
    for d in plan.decisions:
        runs.settle(d)
    return plan


def result_record(run) -> dict[str, Any]:
    """A recorded run as the result its trial reported (metrics and status), e.g. to tell Optuna."""
    return {**run.data.metrics, STATUS_KEY: run.data.tags.get("hisf.status", "finished")}


def clear_trial_folder(trial: Trial, runs_root: str | Path) -> None:
    """A trial that starts fresh must not find another trial's checkpoint in its folder."""
    remove_tree(trial.config.output_dir, runs_root, "trial folder")


# ---- what a retried trial restores (worker side) ---------------------------------------------------------


def restore_tune_checkpoint(group) -> dict[str, int]:
    """Put the members' parts of Tune's last checkpoint of a group (orchestrator/trial_callback.TuneGroupReport:
    one folder per member trial id) where the engine looks, for each member whose folder on this node lacks one;
    returns trial id -> the epochs its part holds (empty on a first attempt)."""
    from ray import tune

    from hisf.engine.checkpoint import checkpoint_path

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return {}
    epochs = {str(k): int(v) + 1 for k, v in ((ckpt.get_metadata() or {}).get("epochs") or {}).items()}
    wanted = {t.trial_id: t for t in group.members if t.trial_id in epochs}
    missing = {tid: t for tid, t in wanted.items() if not checkpoint_path(t.config.output_dir).is_file()}
    if missing:
        with ckpt.as_directory() as src:
            for tid, t in missing.items():
                dest = checkpoint_path(t.config.output_dir).parent
                dest.mkdir(parents=True, exist_ok=True)
                for f in sorted((Path(src) / tid).iterdir()):
                    if f.is_file():
                        shutil.copyfile(f, dest / f.name)
    return {tid: epochs[tid] for tid in wanted}


def restore_train_checkpoint(group) -> dict[str, int]:
    """Copy each member's part of Ray Train's latest checkpoint of a group (one folder per member trial id) into
    its engine checkpoint folder on this node (every rank: without shared storage, other nodes' folders are empty
    or stale); returns trial id -> the epochs its part holds.

    Ray's copy wins over a newer local one, and a member it has none for drops its local one, so that all ranks
    start from the same epoch (a node without shared storage has no local copy to agree with).
    """
    import ray.train

    from hisf.engine.checkpoint import checkpoint_path

    ckpt = ray.train.get_checkpoint()
    epochs = {str(k): int(v) + 1 for k, v in (((ckpt.get_metadata() or {}).get("epochs") or {}) if ckpt else {}).items()}
    for t in group.members:
        dest = checkpoint_path(t.config.output_dir)
        if t.trial_id not in epochs:
            remove_tree(dest, t.config.output_dir, "local checkpoint")
    if not epochs:
        return {}
    with ckpt.as_directory() as src:
        for t in group.members:
            if t.trial_id not in epochs:
                continue
            dest = checkpoint_path(t.config.output_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            for f in sorted((Path(src) / t.trial_id).iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    # Ranks on one node may copy the same file at once: each renames its own whole copy into place.
                    tmp = dest.parent / f".{f.name}.{os.getpid()}.restore"
                    shutil.copyfile(f, tmp)
                    os.replace(tmp, dest.parent / f.name)
    return {t.trial_id: epochs[t.trial_id] for t in group.members if t.trial_id in epochs}


# ---- which checkpoints go once a trial is on record ------------------------------------------------------


def drop_engine_checkpoint(output_dir: str | Path) -> None:
    from hisf.engine.checkpoint import checkpoint_path

    remove_tree(checkpoint_path(output_dir).parent, output_dir, "checkpoint folder")


def drop_ray_checkpoints(fs, path: str | None, owner: str) -> int:
    """Delete the `checkpoint_*` folders of a Tune trial or Ray Train run at `path` on pyarrow filesystem
    `fs` (local, or the cluster's shared storage), inside `owner` (the Ray storage folder); returns how many went."""
    import pyarrow.fs as pafs

    if not path:
        return 0
    fs = fs or pafs.LocalFileSystem()
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return 0
    dropped = 0
    for e in entries:
        if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"):
            try:
                dropped += remove_remote_tree(fs, e.path, owner, "Ray checkpoint")
            except OSError:  # already gone, or storage that refuses: disk only, never the stage's outcome
                pass
    return dropped


class DropFinishedCheckpoints(Callback):
    """Driver side: Tune's copy of a group's checkpoints goes when the Tune trial completes with every member
    finished or pruned.

    Each member's process recorded it in MLflow before the group's last report, so by now they are on record and a
    `--resume` skips them; a group with a member that failed (or that is retried) keeps its checkpoints.
    """

    def __init__(self, owner: str | Path):
        self.owner = str(owner)  # the stage's Ray storage folder (<workdir>/ray_results)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ids = [m["trial_id"] for m in trial.config["group"]["members"]]
        if all(r[STATUS_KEY] in DONE for r in member_results(trial.last_result, ids).values()):
            drop_ray_checkpoints(trial.storage.storage_filesystem, trial.path, self.owner)
