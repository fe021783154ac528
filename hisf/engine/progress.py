"""What a running trial reports: the epoch means of its loss terms, the progress line and `on_progress`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from hisf.config import TrainConfig
from hisf.engine.callbacks import TrialCallback, call
from hisf.engine.distributed import DistEnv

log = logging.getLogger("hisf.engine")


@dataclass
class LossMeter:
    """Epoch means of the model's loss terms (`model.loss_terms`), over the steps with a finite loss."""

    terms: tuple[str, ...]
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        self.sums = {k: 0.0 for k in self.terms}

    def add(self, losses: dict[str, float]) -> None:
        if all(math.isfinite(v) for v in losses.values()):
            self.count += 1
            for k, v in losses.items():
                self.sums[k] += v

    def means(self) -> dict[str, float]:
        return {f"train/{k}": (self.sums[k] / self.count if self.count else float("nan")) for k in self.terms}


class Progress:
    """Every `train.log_every` steps of an epoch: the progress line (rank 0, when `log`) and `on_progress`, with the
    images/s since the last one and an ETA for the trial. One per member of a group; the first member's logs."""

    def __init__(self, tc: TrainConfig, env: DistEnv, callbacks: list[TrialCallback], epoch: int, epochs: int,
                 steps_per_epoch: int, lr: float, log: bool = True, members: int = 1):
        self.every, self.env, self.callbacks = tc.log_every, env, callbacks
        self.epoch, self.epochs, self.lr = epoch, epochs, lr
        self.total = steps_per_epoch * epochs
        self.images_per_step = tc.batch_size * env.world_size
        self.since, self.images = time.perf_counter(), 0
        self.log, self.members = log, members

    def step(self, step: int, skipped_steps: int, losses: dict[str, float]) -> tuple[bool, bool]:
        """Count step `step` (1-based over the trial); (whether this was a reporting step, whether a callback asked
        to stop). The stop flag is this rank's: the caller agrees it over ranks (any_rank_each) on reporting steps."""
        self.images += self.images_per_step
        if not self.every or step % self.every:
            return False, False
        now = time.perf_counter()
        ips = self.images / max(now - self.since, 1e-9)
        self.since, self.images = now, 0
        if self.env.is_main and self.log:
            terms = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items() if k != "loss")
            eta = (self.total - step) * self.images_per_step / max(ips, 1e-9)
            group = f" ({self.members} members, each at this speed)" if self.members > 1 else ""
            log.info("epoch %d/%d step %d/%d loss %.4f (%s) lr %.3g %.1f img/s ETA %s%s", self.epoch + 1, self.epochs,
                     step, self.total, losses["loss"], terms, self.lr, ips, format_eta(eta), group)
        progress = {**{f"train/{k}": v for k, v in losses.items()}, "lr": self.lr, "images_per_s": ips,
                    "epoch": self.epoch, "skipped_steps": skipped_steps}
        return True, call(self.callbacks, "on_progress", step, self.total, progress)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
