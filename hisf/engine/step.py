"""One training step of a group's members: precision (fp16 + GradScaler, bf16, fp32), the step, torch.compile, the NaN guard."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from hisf.engine.distributed import DistEnv, all_reduce_grads, all_reduce_sum

if TYPE_CHECKING:
    from hisf.engine.checkpoint import TrialState

log = logging.getLogger("hisf.engine")

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
    grad_scaling: bool = False  # fp16: each member scales its loss with its own GradScaler

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def new_scaler(self) -> torch.amp.GradScaler | None:
        """A member's own GradScaler (fp16), so an overflow in one member backs off that member's scale only."""
        return torch.amp.GradScaler(self.device_type) if self.grad_scaling else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """fp16 = autocast + GradScaler (CUDA only); bf16 = autocast without scaling; fp32 = plain."""
    if name == "fp16" and device.type != "cuda":
        warnings.warn("train.precision fp16 needs CUDA; running bf16 autocast on CPU instead", stacklevel=2)
        name = "bf16"
    if name == "fp16":
        return Precision("fp16", device.type, torch.float16, grad_scaling=True)
    if name == "bf16":
        return Precision("bf16", device.type, torch.bfloat16)
    return Precision("fp32", device.type, None)


# --- one training step -------------------------------------------------------------------------------


@dataclass
class StepResult:
    losses: dict[str, float]  # every rank's mean of each loss term (this member's)
    finite: bool  # the optimised loss `loss` was finite (on every rank); logged-only terms do not count
    skipped: bool  # no optimiser update happened (non-finite loss, or a non-finite/overflowed gradient)


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    members: Sequence["TrialState"],
    precision: Precision,
    env: DistEnv,
) -> list[StepResult]:
    """One step of the members `members` (their TrialStates, each over its slice of the stacked parameters):
    one forward of every member's batch (images member-major [K·B, ...], labels [K, B]), one backward of the
    members' summed (in fp16: each scaled by its own GradScaler) losses, gradients averaged over ranks, then per
    member: finiteness check, and its optimiser's step unless non-finite. Returns one StepResult per member.

    The members' parameters are disjoint and no frozen-encoder operation mixes two samples, so member k's
    gradients are those of its loss alone. The three precisions account alike: a step is skipped exactly when no
    optimiser update happens, which is when the optimised loss or a gradient is non-finite. A non-finite term
    that is only logged (a zero weight keeps it out of `loss`) neither stops the update nor counts as skipped.
    Members of the model left out of `members` (stopped mid-epoch) are computed but never updated.
    """
    names = loss_terms(model)
    stacked = members[0].stacked() if members else []
    for p in stacked:
        p.grad = None
    with precision.autocast():
        out = model.forward_losses(images, labels)
    index = [m.member for m in members]
    terms = torch.stack([out[k].detach().float() for k in names])[:, index]  # [T, M]
    losses = out["loss"].float()
    total = sum(m.scaler.scale(losses[m.member]) if m.scaler is not None else losses[m.member] for m in members)
    total.backward()
    all_reduce_grads(stacked, env)
    if env.distributed:
        terms = all_reduce_sum(terms, env) / env.world_size
    for m in members:
        m.bind_grads()
        if m.scaler is not None:
            # Unscaled in place now (scaler.step then doesn't again), so the check below is the scaler's found_inf.
            m.scaler.unscale_(m.optimizer)
    # Per member: every one of its gradients finite ([K] over the model's member axis).
    grads = [torch.isfinite(p.grad).flatten(1).all(dim=1) for p in stacked if p.grad is not None]
    grads_finite = (torch.stack(grads).all(dim=0)[index] if grads else
                    torch.ones(len(members), dtype=torch.bool, device=terms.device))
    # The step's one host sync: the logged losses and the NaN guard need the values, and the skip decisions
    # need the flags; everything before it (forward, backward, grad sync) is queued without waiting.
    values = torch.cat([terms.flatten(), grads_finite.float()]).tolist()
    results = []
    for j, m in enumerate(members):
        mine = dict(zip(names, values[j::len(members)][:len(names)]))
        finite = math.isfinite(mine["loss"])
        update = finite and bool(values[len(names) * len(members) + j])
        if m.scaler is not None:
            # The scaler sees the all-reduced grads, so every rank skips (and backs off) together. Its step is
            # called only when we update: with finite grads it would otherwise step on a non-finite loss.
            # update() still runs every step (unscale_ recorded found_inf, so an overflow backs the scale off).
            if update:
                m.scaler.step(m.optimizer)
            m.scaler.update()
        elif update:
            m.optimizer.step()
        results.append(StepResult(mine, finite, not update))
    return results


def compile_losses(model: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> None:
    """Replace `model.forward_losses` by its torch.compile'd self (the model is already on the trial's device).

    forward_losses has no host sync and no graph break (class-set constants are computed in set_classnames),
    so the forward and its backward are captured whole; evaluation's `model(images)` stays eager. The
    compiled function holds the model (model -> compiled fn -> bound method -> model, a reference cycle):
    `release_compiled(model)` breaks it at the end of the model's life (run_trial does).
    """
    model.forward_losses = torch.compile(model.forward_losses, mode=mode, backend=backend)


def release_compiled(model: torch.nn.Module | None) -> None:
    """Undo compile_losses and drop every compiled graph of this process (Dynamo's caches, CUDA graph pools).

    A reused Tune actor runs trial after trial in one process: without this, each finished trial's model
    (the frozen CLIP included) stays on the GPU until a cyclic GC, and Dynamo's per-code cache (shared by
    every PromptModel's forward_losses) fills up until the recompile limit silently turns compile and CUDA
    graphs off for the rest of the worker's life. Each trial therefore starts with a fresh cache.
    """
    if model is not None:
        vars(model).pop("forward_losses", None)
    torch._dynamo.reset()


def compile_stats() -> dict[str, int]:
    """Dynamo's process-wide counters: frames compiled, and frames left eager (the recompile limit was hit)."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {"compiled_frames": int(frames["ok"]), "eager_fallbacks": int(frames["total"] - frames["ok"])}


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


# cuBLAS's deterministic workspace settings (its docs); PyTorch's own default on H100/H200 is :4096:8 too.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def cublas_workspace_for_determinism() -> str | None:
    """Set CUBLAS_WORKSPACE_CONFIG=:4096:8 unless it holds a deterministic value; the warning to log when it
    cannot take effect, else None.

    cuBLAS reads the variable when this process makes its first handle (its first CUDA matmul), so setting
    it helps only before that. `torch.cuda.is_initialized()` is the closest public sign that it may be too
    late (a reused worker process that already trained); the fix is to set it where the process starts
    (hisf-bench's Ray workers get it from the runtime environment, torchrun users prefix the command).
    """
    current = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if current in CUBLAS_DETERMINISTIC:
        return None
    if current is not None:
        return (f"train.deterministic: CUBLAS_WORKSPACE_CONFIG={current!r} is none of cuBLAS's deterministic settings "
                f"{list(CUBLAS_DETERMINISTIC)}; left as set, so CUDA matmuls may not be bit-reproducible")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    if torch.cuda.is_initialized():
        return ("train.deterministic: CUBLAS_WORKSPACE_CONFIG was unset and CUDA is already initialised in this "
                "process, so cuBLAS may have made its handles without it and CUDA matmuls may not be bit-reproducible; "
                "set CUBLAS_WORKSPACE_CONFIG=:4096:8 where the worker process starts "
                "(e.g. `CUBLAS_WORKSPACE_CONFIG=:4096:8 torchrun ...`)")
    return None


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """`train.deterministic`: bit-reproducible kernels for the span of a trial, then the process's flags back.

    On: torch.use_deterministic_algorithms (warn_only: an op without a deterministic CUDA kernel, such as
    NLLLoss's, warns instead of failing the trial), cuDNN deterministic and not benchmarking, TF32 off for
    matmul and cuDNN, scaled-dot-product attention on its math backend only (with warn_only, PyTorch would
    keep the flash and memory-efficient backwards, which are not deterministic; the math one is), and
    CUBLAS_WORKSPACE_CONFIG=:4096:8 (cublas_workspace_for_determinism: logged when it comes too late). Off:
    nothing is touched. Resume and compiled-vs-eager equality hold exactly on the CPU; on a GPU they need
    this mode or tolerances (CUDA atomics in index_add/index backward and TF32 change low bits).

    Inductor under this mode lowers the accumulating index_put (the text pooling's backward) and scatter to
    aten's deterministic sort-based kernels. torch >= 2.10 keeps CUDA graphs for them (integer indices);
    older torch turns CUDA graphs off for every graph holding one, which `CudaGraphSkips` reports.
    """
    if not on:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    late = cublas_workspace_for_determinism()
    if late:
        log.warning(late)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        # sdpa_kernel restores the backends it found on exit (torch >= 2.3; the same flags as
        # torch.backends.cuda.enable_*_sdp, which also steer the CPU's choice).
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[2:]


# Before this version Inductor turns CUDA graphs off for a graph with a deterministic index_put/scatter
# fallback (pytorch/pytorch#170103, cherry-picked into 2.10 as #170884).
CUDAGRAPH_DETERMINISTIC_FIX = (2, 10)


class CudaGraphSkips(logging.Handler):
    """Collects Inductor's "skipping cudagraphs due to ..." warnings and skip count while installed (`with`).

    Inductor logs them at WARNING on a `torch._inductor` child logger and counts them in
    counters["inductor"]["cudagraph_skips"] (a graph Inductor partitions around an unsafe op, its default
    from torch 2.10, can skip without a count: pytorch/pytorch#176611; our step has no such op).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []
        self.start = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cudagraph" in message.lower() and ("skip" in message.lower() or "disabl" in message.lower()):
            first = message.strip().splitlines()[0].strip()[:300]
            if first not in self.reasons:
                self.reasons.append(first)

    def __enter__(self) -> "CudaGraphSkips":
        from torch._dynamo.utils import counters

        self.start = int(counters["inductor"]["cudagraph_skips"])
        logging.getLogger("torch._inductor").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("torch._inductor").removeHandler(self)

    @property
    def count(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"]) - self.start

    def report(self, device: torch.device, deterministic: bool) -> str | None:
        """The trial-log line when CUDA graphs were turned off for some compiled graph, else None."""
        if not self.count and not self.reasons:
            return None
        why = "; ".join(self.reasons) or "Inductor logged no reason (TORCH_LOGS=cudagraphs shows more)"
        line = (f"train.compile_mode reduce-overhead: {self.count or len(self.reasons)} compiled graph(s) run "
                f"without CUDA graphs ({why})")
        if device.type != "cuda":
            line += "; CUDA graphs need a CUDA device"
        elif deterministic and torch_version() < CUDAGRAPH_DETERMINISTIC_FIX:
            line += (f"; under train.deterministic, torch {torch.__version__} turns CUDA graphs off for the "
                     f"deterministic index_put/scatter fallbacks (torch >= 2.10 keeps them): drop train.deterministic "
                     f"to time the step with CUDA graphs")
        return line


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


