"""The trial engine: one trial from a frozen TrialConfig to final metrics (DDP, mixed precision, resume, callbacks)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from hisf import checkpoint as ckpt
from hisf.config import ConfigError, TrialConfig
from hisf.distributed import (DistEnv, all_reduce_grads, all_reduce_sum, any_rank, barrier, broadcast_params,
                              init_from_env, shutdown)
from hisf.evaluation import accuracy
from hisf.optim import build_optimizer, build_scheduler
from hisf.trial_data import TrialData, evaluate_protocol, open_trial_data

log = logging.getLogger("hisf.engine")

LOSS_TERMS = ("loss", "loss_cls", "loss_le", "loss_sa")


class StopTrial(Exception):
    """Raised by a callback (e.g. an Optuna pruner) to end the trial cleanly after the current step or epoch."""


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for `train.max_nonfinite_steps` steps in a row: training is diverging."""


class TrialCallback:
    """Listener interface; every method is optional and called on rank 0 only."""

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint_dir: str) -> None: ...

    def on_progress(self, step: int, total: int, metrics: dict) -> None: ...

    def on_trial_end(self, metrics: dict, artifacts: dict[str, str]) -> None: ...


# --- precision ---------------------------------------------------------------------------------------


@dataclass
class Precision:
    name: str  # what actually runs (fp16 falls back to bf16 on CPU)
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """fp16 = autocast + GradScaler (CUDA only); bf16 = autocast without scaling; fp32 = plain."""
    if name == "fp16" and device.type != "cuda":
        warnings.warn("train.precision fp16 needs CUDA; running bf16 autocast on CPU instead", stacklevel=2)
        name = "bf16"
    if name == "fp16":
        return Precision("fp16", device.type, torch.float16, torch.amp.GradScaler(device.type))
    if name == "bf16":
        return Precision("bf16", device.type, torch.bfloat16, None)
    return Precision("fp32", device.type, None, None)


# --- one training step -------------------------------------------------------------------------------


@dataclass
class StepResult:
    losses: dict[str, float]  # every rank's mean of each loss term
    finite: bool  # the loss was finite (on every rank)
    skipped: bool  # no optimiser update happened (non-finite loss, or fp16 overflow)


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    params: Sequence[torch.nn.Parameter],
    env: DistEnv,
) -> StepResult:
    """Forward the loss terms (eq. 12), backward, average trainable grads over ranks, step unless non-finite."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        out = model.forward_losses(images, labels)
    terms = torch.stack([out[k].detach().float() for k in LOSS_TERMS])
    loss = out["loss"].float()
    scaler = precision.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    all_reduce_grads(list(params), env)
    if env.distributed:
        terms = all_reduce_sum(terms, env) / env.world_size
    values = terms.tolist()
    finite = all(math.isfinite(v) for v in values)
    if scaler is not None:
        # The scaler sees the all-reduced grads, so every rank skips (and backs off) together.
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale or not finite
    else:
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        skipped = not (finite and grads_finite)
        if not skipped:
            optimizer.step()
    return StepResult(dict(zip(LOSS_TERMS, values)), finite, skipped)


class NanGuard:
    """Counts consecutive non-finite losses; stops the trial before it trains on NaNs for long."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0

    def update(self, finite: bool, step: int, losses: dict[str, float]) -> None:
        self.consecutive = 0 if finite else self.consecutive + 1
        if self.consecutive >= self.limit:
            raise NonFiniteLossError(
                f"non-finite loss for {self.consecutive} steps in a row (up to step {step}; last terms {losses}); "
                f"stopping instead of training on NaNs (train.max_nonfinite_steps={self.limit}): lower the "
                f"learning rate, use precision fp32/bf16, or check the data"
            )


# --- the trial -----------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Meter:
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in LOSS_TERMS})
    count: int = 0

    def add(self, losses: dict[str, float]) -> None:
        if all(math.isfinite(v) for v in losses.values()):
            self.count += 1
            for k, v in losses.items():
                self.sums[k] += v

    def means(self) -> dict[str, float]:
        return {f"train/{k}": (self.sums[k] / self.count if self.count else float("nan")) for k in LOSS_TERMS}


def _call(callbacks: Iterable[TrialCallback], hook: str, *args: Any) -> bool:
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


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_trial(cfg: TrialConfig, callbacks: Sequence[TrialCallback] = (), resume: bool = True) -> dict[str, float]:
    """Train and evaluate one trial; returns the final metrics (docs/interfaces.md) on every rank."""
    if not isinstance(cfg, TrialConfig):
        raise TypeError(f"run_trial: expected a TrialConfig, got {type(cfg).__name__}")
    cfg.validate()
    env = init_from_env(cfg.device)
    try:
        return _run(cfg, list(callbacks), resume, env)
    finally:
        shutdown(env)


def _run(cfg: TrialConfig, callbacks: list[TrialCallback], resume: bool, env: DistEnv) -> dict[str, float]:
    from hisf.backbone import load_backbone
    from hisf.methods import build_method

    callbacks = callbacks if env.is_main else []
    out_dir = Path(cfg.output_dir)
    tc = cfg.train
    precision = resolve_precision(tc.precision, env.device)

    # Everything that can be wrong with the data is checked before the model is built.
    data: TrialData = open_trial_data(cfg, env)
    seed_everything(cfg.seed)
    backbone = load_backbone(cfg.backbone)
    model = build_method(cfg.method, backbone, data.train.classnames, template=data.template)
    data.bind(backbone, cfg)
    model.to(env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    train_epochs = tc.epochs if params else 0

    optimizer = build_optimizer(tc, model.param_groups()) if train_epochs else None
    scheduler = build_scheduler(optimizer, tc) if optimizer else None
    opt_params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    state = ckpt.load_checkpoint(out_dir, cfg, data.train.classnames) if resume else None
    start_epoch, history, skipped_total, global_step, train_seconds, eval_seconds = 0, [], 0, 0, 0.0, 0.0
    if state is not None:
        model.load_trainable_state_dict(state["trainable"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        if precision.scaler is not None and state["scaler"]:
            precision.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], list(state["history"])
        skipped_total, global_step = state["skipped_steps"], state["global_step"]
        train_seconds, eval_seconds = state["train_seconds"], state["eval_seconds"]
        if env.is_main:
            log.info("resuming %s from epoch %d/%d", out_dir, start_epoch, train_epochs)
    broadcast_params(params, env)

    steps_per_epoch = len(data.train_loader(epoch=0)) if train_epochs else 0
    total_steps = steps_per_epoch * train_epochs
    guard = NanGuard(tc.max_nonfinite_steps)
    stop = False
    if env.is_main:
        log.info("trial %s: %s on %s (%s), %d trainable params, %d rank(s) x batch %d, %d steps/epoch, %s",
                 out_dir, cfg.method.name, cfg.data.dataset, cfg.protocol, n_trainable, env.world_size,
                 tc.batch_size, steps_per_epoch, precision.name)

    for epoch in range(start_epoch, train_epochs):
        t0 = time.perf_counter()
        meter, t_log, seen = _Meter(), time.perf_counter(), 0
        lr = optimizer.param_groups[0]["lr"]
        for images, labels in data.train_loader(epoch=epoch):
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            res = train_step(model, images, labels, optimizer, precision, opt_params, env)
            global_step += 1
            skipped_total += int(res.skipped)
            meter.add(res.losses)
            guard.update(res.finite, global_step, res.losses)
            seen += tc.batch_size * env.world_size
            if tc.log_every and global_step % tc.log_every == 0:
                ips = seen / max(time.perf_counter() - t_log, 1e-9)
                t_log, seen = time.perf_counter(), 0
                progress = {**{f"train/{k}": v for k, v in res.losses.items()}, "lr": lr, "images_per_s": ips,
                            "epoch": epoch, "skipped_steps": skipped_total}
                if env.is_main:
                    eta = (total_steps - global_step) * tc.batch_size * env.world_size / max(ips, 1e-9)
                    log.info("epoch %d/%d step %d/%d loss %.4f (cls %.4f le %.4f sa %.4f) lr %.3g %.1f img/s ETA %s",
                             epoch + 1, train_epochs, global_step, total_steps, *res.losses.values(), lr, ips,
                             _format_eta(eta))
                stop = any_rank(_call(callbacks, "on_progress", global_step, total_steps, progress), env)
                if stop:
                    break
        scheduler.step()
        train_seconds += time.perf_counter() - t0
        if stop:
            break
        metrics = {**meter.means(), "lr": lr, "epoch": epoch, "skipped_steps": skipped_total}
        if tc.validate_every_epoch:
            t1 = time.perf_counter()
            metrics["val_acc"] = accuracy(model, data.val_loader(), env, precision.autocast)
            eval_seconds += time.perf_counter() - t1
        history.append(metrics)
        state = {
            "identity": ckpt.identity(cfg), "classnames": list(data.train.classnames), "epoch": epoch + 1,
            "trainable": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler is not None else {},
            "rng": ckpt.rng_state(), "history": history, "skipped_steps": skipped_total,
            "global_step": global_step, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        }
        ckpt_dir = ckpt.save_checkpoint(out_dir, state) if env.is_main else ckpt.checkpoint_path(out_dir).parent
        barrier(env)
        if env.is_main:
            log.info("epoch %d/%d done: %s", epoch + 1, train_epochs,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        stop = any_rank(_call(callbacks, "on_epoch_end", epoch, dict(metrics), str(ckpt_dir)), env)
        if stop:
            break

    last = dict(history[-1]) if history else {}
    common = {"train_seconds": train_seconds, "trainable_params": float(n_trainable)}
    if stop:
        return {**last, **common, "eval_seconds": eval_seconds, "stopped": 1.0}

    # Prompts are exported before evaluation switches the class set (novel/target names).
    artifacts: dict[str, str] = {}
    if env.is_main:
        artifacts["prompts"] = str(ckpt.export_prompts(out_dir / ckpt.PROMPTS_FILE, model.trainable_state_dict(),
                                                       cfg, data.train.classnames))
    t1 = time.perf_counter()
    final = {"val_acc": last["val_acc"] if "val_acc" in last else accuracy(model, data.val_loader(), env, precision.autocast)}
    final.update(evaluate_protocol(model, data, env, precision.autocast))
    eval_seconds += time.perf_counter() - t1
    result = {**last, **final, **common, "eval_seconds": eval_seconds}
    result.setdefault("skipped_steps", float(skipped_total))
    result = {k: float(v) for k, v in result.items()}
    if env.is_main:
        import yaml

        artifacts["config"] = str(out_dir / "config.yaml")
        ckpt.atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), artifacts["config"])
        artifacts["metrics"] = str(out_dir / "metrics.json")
        ckpt.atomic_write_text(json.dumps({"final": result, "epochs": history}, indent=2), artifacts["metrics"])
        log.info("trial done in %.1fs train + %.1fs eval: %s", train_seconds, eval_seconds,
                 " ".join(f"{k} {v:.4g}" for k, v in final.items()))
        _call(callbacks, "on_trial_end", dict(result), dict(artifacts))
    barrier(env)
    return result
