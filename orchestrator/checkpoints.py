"""Trial checkpoints on disk: dropped once a trial has finished and been recorded, unless `keep_checkpoints`.

A finished trial's last training checkpoint exists twice, the engine's `output_dir/checkpoint/` and Tune's
(or Ray Train's) copy in the Ray storage folder; for ViT-B/16 HISF each is ~112 MB, which a large grid
multiplies into terabytes. Both only serve resuming an unfinished trial. So: once a trial's MLflow run says
finished (or pruned) the trial process drops the engine's folder and its Ray Train copy (DDP), and the
driver drops Tune's copy when Tune reports the trial complete. (DDP ranks drop their node's engine folder
when training has ended: Ray Train's copy, kept until the run is on record, is what a retry resumes from.)
Metrics, config and exported prompts stay. Failed and interrupted trials keep everything: `--resume` and
Tune's retries continue from them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ray.tune import Callback

DONE = ("finished", "pruned")


def drop_engine_checkpoint(output_dir: str | Path) -> None:
    from hisf.engine.checkpoint import checkpoint_path

    shutil.rmtree(checkpoint_path(output_dir).parent, ignore_errors=True)


def drop_ray_checkpoints(fs, path: str | None) -> int:
    """Delete the `checkpoint_*` folders of a Tune trial or Ray Train run at `path` on pyarrow filesystem
    `fs` (local, or the cluster's shared storage); returns how many went."""
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
                fs.delete_dir(e.path)
                dropped += 1
            except OSError:  # already gone, or storage that refuses: disk only, never the stage's outcome
                pass
    return dropped


class DropFinishedCheckpoints(Callback):
    """Driver side: Tune's copy of a trial's checkpoints goes when the trial completes as finished/pruned.

    The trial's own process recorded it in MLflow before its last report, so by now it is on record and a
    `--resume` skips it; a trial that failed for good (or is retried) keeps its checkpoints.
    """

    def on_trial_complete(self, iteration, trials, trial, **info):
        from orchestrator.tuning import FINAL_KEY, STATUS_KEY

        result = trial.last_result or {}
        if result.get(FINAL_KEY) and result.get(STATUS_KEY) in DONE:
            drop_ray_checkpoints(trial.storage.storage_filesystem, trial.path)
