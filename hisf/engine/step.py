"""One training step: precision (fp16 + GradScaler, bf16, fp32), the step itself, torch.compile, the NaN guard."""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hisf.engine.distributed import DistEnv, all_reduce_grads, all_reduce_sum

# The loss terms of a model that declares none (`model.loss_terms`, "loss" first, is the method's own list).
LOSS_TERMS = ("loss",)


def loss_terms(model: torch.nn.Module) -> tuple[str, ...]:
    """The names a model's forward_losses returns and the engine logs as `train/<term>`."""
    terms = tuple(getattr(model, "loss_terms", LOSS_TERMS))
    if not terms or terms[0] != "loss":
        raise ValueError(f"model.loss_terms: expected a tuple starting with 'loss', got {terms!r}")
    return terms


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for `train.max_nonfinite_steps` steps in a row: training is diverging."""


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
    """Forward the model's loss terms, backward, average trainable grads over ranks, step unless non-finite."""
    names = loss_terms(model)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        out = model.forward_losses(images, labels)
    terms = torch.stack([out[k].detach().float() for k in names])
    loss = out["loss"].float()
    scaler = precision.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    all_reduce_grads(list(params), env)
    if env.distributed:
        terms = all_reduce_sum(terms, env) / env.world_size
    if scaler is not None:
        # Unscaled in place now (scaler.step then doesn't again), so the check below is the scaler's found_inf.
        scaler.unscale_(optimizer)
    grads = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    grads_finite = torch.stack(grads).all() if grads else torch.ones((), dtype=torch.bool, device=terms.device)
    # The step's one host sync: the logged losses and the NaN guard need the values, and the skip decision
    # needs the flag; everything before it (forward, backward, grad sync) is queued without waiting.
    *values, grads_ok = torch.cat([terms, grads_finite.float()[None]]).tolist()
    finite = all(math.isfinite(v) for v in values)
    skipped = not (finite and grads_ok)
    if scaler is not None:
        # The scaler sees the all-reduced grads, so every rank skips (and backs off) together, exactly when a
        # grad is non-finite (the flag above); its own found_inf read is no stall, the device is idle by now.
        scaler.step(optimizer)
        scaler.update()
    elif not skipped:
        optimizer.step()
    return StepResult(dict(zip(names, values)), finite, skipped)


def compile_losses(model: torch.nn.Module, mode: str = "default") -> None:
    """Replace `model.forward_losses` by its torch.compile'd self (the model is already on the trial's device).

    forward_losses has no host sync and no graph break (class-set constants are computed in set_classnames),
    so the forward and its backward are captured whole; evaluation's `model(images)` stays eager.
    """
    model.forward_losses = torch.compile(model.forward_losses, mode=mode)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


