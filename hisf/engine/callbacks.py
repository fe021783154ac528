"""What a trial tells its listeners: the TrialCallback hooks, StopTrial, and calling them on the right ranks."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

log = logging.getLogger("hisf.engine")


class StopTrial(Exception):
    """Raised by a callback (e.g. an Optuna pruner) to end the trial cleanly after the current step or epoch."""


class TrialCallback:
    """Listener interface; every method is optional and called on rank 0 only, unless the callback sets
    `all_ranks = True` (then on every rank, with the same epochs and metrics; e.g. Ray Train's
    `ray.train.report`, which every worker must call the same number of times)."""

    all_ranks: bool = False

    # TrialData.describe() (image_mode, dataset, bad_images_left_out) plus precision, compile, device_name.
    def on_trial_start(self, data: dict) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None: ...

    def on_progress(self, step: int, total: int, metrics: dict) -> None: ...

    def on_trial_end(self, metrics: dict, artifacts: dict[str, str]) -> None: ...


class GroupCallback:
    """Listener of a whole group (docs/fusion.md), once per epoch boundary after every member's own callbacks: e.g.
    one Tune report with one checkpoint holding every member's. Rank 0 only unless `all_ranks = True`.

    `records`: one per member that finished an epoch at this boundary, `{"member": its position in the group's
    configs, "epoch": the epoch (0-based), "metrics": its epoch metrics, "checkpoint_dir": its checkpoint folder,
    "stopped": whether it leaves now (pruned or stopped)}`."""

    all_ranks: bool = False

    def on_epoch_end(self, records: list[dict]) -> None: ...


def listeners(callbacks: Sequence[TrialCallback], is_main: bool) -> list[TrialCallback]:
    """The callbacks this rank calls: all of them on rank 0, the `all_ranks` ones elsewhere."""
    return [cb for cb in callbacks if is_main or getattr(cb, "all_ranks", False)]


def call(callbacks: Iterable[TrialCallback], hook: str, *args: Any) -> bool:
    """Run one hook on every callback; True when one asked to stop."""
    stop = False
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except StopTrial as e:
            log.info("trial stopped by %s: %s", type(cb).__name__, e)
            stop = True
    return stop
