"""One member of a fused group (docs/fusion.md): a trial's own config, callbacks, data, resume identity, NaN guard and
training state over its slice of the model's stacked parameters, and what it leaves with.

A member is everything that makes a trial's numbers its own while it shares a process, a backbone and every
forward with the other members. A trial alone is a group of one member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hisf.config import TrialConfig
from hisf.engine import checkpoint as ckpt
from hisf.engine.callbacks import StopTrial, TrialCallback
from hisf.engine.optim import member_optimizer
from hisf.engine.progress import LossMeter, Progress
from hisf.engine.step import NanGuard, loss_terms
from hisf.engine.trial_data import TrialData

log = logging.getLogger("hisf.engine")

TRAINING, STOPPED, FAILED = "training", "stopped", "failed"


@dataclass
class Member:
    cfg: TrialConfig
    callbacks: list[TrialCallback]
    data: TrialData
    identity: ckpt.ResumeIdentity
    guard: NanGuard
    state: ckpt.TrialState | None = None
    epochs: int = 0  # 0 when nothing is trainable
    resumed: bool = False
    # training | stopped (a callback asked: mid-epoch, or at an epoch's end, e.g. pruned) | failed (its own error)
    outcome: str = TRAINING
    result: dict[str, float] | BaseException | None = None
    # This epoch's meter, progress reporter and metrics (the group's loop fills them).
    meter: LossMeter | None = field(default=None, repr=False)
    progress: Progress | None = field(default=None, repr=False)
    epoch_metrics: dict[str, float] = field(default_factory=dict)
    # [C, C] confusion count of its latest validation (hisf.engine.evaluation), None before one ran in this process.
    val_confusion: Any = field(default=None, repr=False)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def done(self) -> bool:
        """Trained all its epochs (and not stopped or failed)."""
        return self.outcome == TRAINING and self.state.epoch >= self.epochs

    @property
    def leaving(self) -> bool:
        return self.outcome != TRAINING or self.state.epoch >= self.epochs

    def bind(self, model: Any, index: int, precision: Any, scaler: Any = None) -> None:
        """Give the member its place `index` on `model`'s member axis: a fresh optimiser and schedule over its views
        and its (fp16) GradScaler (`scaler` keeps an earlier one). Whatever it held before is the caller's to load
        back (`state.load_state_dict`), exactly as a resume restores it."""
        if self.epochs:
            optimizer, scheduler, pairs = member_optimizer(model, index, self.cfg.train)
            scaler = scaler if scaler is not None else precision.new_scaler()
            self.state = ckpt.TrialState(model, optimizer, scheduler, scaler, member=index, pairs=pairs)
        else:
            self.state = ckpt.TrialState(model, member=index)

    def call(self, hook: str, *args: Any) -> bool:
        """Run one hook of this member's callbacks; True when one asked to stop. Any other error of a callback
        fails this member alone (its tracker, its pruner), not the group."""
        stop = False
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except StopTrial as e:
                log.info("trial %s stopped by %s: %s", self.out_dir, type(cb).__name__, e)
                stop = True
            except Exception as e:  # noqa: BLE001 - the member's own failure, reported as its outcome
                self.fail(e)
        return stop

    def fail(self, error: BaseException) -> None:
        if self.outcome != FAILED:
            self.outcome, self.result = FAILED, error

    def start_epoch(self, steps_per_epoch: int, env: Any, log_line: bool, members: int) -> None:
        s, tc = self.state, self.cfg.train
        lr = s.optimizer.param_groups[0]["lr"]
        self.meter = LossMeter(loss_terms(s.model))
        self.progress = Progress(tc, env, self.callbacks, s.epoch, self.epochs, steps_per_epoch, lr, log_line, members)
        self.epoch_metrics = {"lr": lr, "epoch": s.epoch}

    def stopped_result(self) -> dict[str, float]:
        """What a stopped trial returns: its last finished epoch's metrics and its totals, `stopped` 1."""
        s = self.state
        last = dict(s.history[-1]) if s.history else {}
        return {k: float(v) for k, v in {**last, **self.totals(), "eval_seconds": s.eval_seconds, "stopped": 1}.items()}

    def totals(self) -> dict[str, float]:
        s = self.state
        return {"train_seconds": s.train_seconds, "trainable_params": s.model.num_trainable(),
                "skipped_steps": s.skipped_steps}
