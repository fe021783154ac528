"""Helpers for the CUDA tests: deterministic flags, a tiny real prompt model with its optimiser, CUDA trial configs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from hisf.config import BackboneConfig, MethodConfig, TrainConfig
from hisf.engine import seed_everything
from hisf.engine.checkpoint import TrialState
from hisf.engine.distributed import DistEnv
from hisf.engine.optim import member_optimizer
from tests.hisf.engine.helpers import tiny_trial_dict
from tests.support import child_env

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "trial_runner.py"


def deterministic_flags() -> None:
    """Deterministic CUDA kernels and no TF32, so two runs of one computation agree bit for bit.

    warn_only: an op without a deterministic CUDA kernel warns instead of failing the test.
    CUBLAS_WORKSPACE_CONFIG only takes effect before cuBLAS starts (fresh processes get it from trial_env()).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cuda_env(device: torch.device) -> DistEnv:
    return DistEnv(0, 1, 0, device, owns_group=False)


def classnames(n: int) -> list[str]:
    return [f"class {i}" for i in range(n)]


def tiny_setup(method: str, device: torch.device, storage: str = "fp32", n_classes: int = 50, lr: float = 0.05):
    """hisf-tiny (random weights, seeded: the same numbers for every storage precision) with `method` at depth 3
    on `device`, in training mode, with the paper's SGD (constant lr: no warm-up epoch); returns (model, [its one
    member's TrialState]), the state's GradScaler unset (a test sets one for fp16)."""
    from hisf.model.backbone import load_backbone
    from hisf.model.methods import build_method

    seed_everything(0)
    backbone = load_backbone(BackboneConfig(name="hisf-tiny", pretrained=None, precision=storage))
    backbone.model.to(device)
    model = build_method(MethodConfig(name=method, depth=3), backbone, classnames(n_classes)).to(device).train()
    opt, sched, pairs = member_optimizer(model, 0, TrainConfig(preset="paper", lr=lr, warmup_epochs=0))
    return model, [TrialState(model, opt, sched, None, member=0, pairs=pairs)]


def tiny_batch(device: torch.device, n_classes: int = 50, batch: int = 8, size: int = 32):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, n_classes, (batch,), generator=g)
    return images.to(device), labels.to(device)


def assert_same_update(before: dict, got: dict, want: dict, rel: float) -> None:
    """Each trainable tensor moved from `before` like `want` did, up to `rel` of that move (and it did move)."""
    moved = 0.0
    for k, b in before.items():
        d_got, d_want = (got[k] - b).double(), (want[k] - b).double()
        moved += float(d_want.norm())
        err = float((d_got - d_want).norm())
        assert err <= rel * float(d_want.norm()) + 1e-7, f"{k}: update differs by {err:.3g}, |update| {float(d_want.norm()):.3g}"
    assert moved > 0, "no trainable tensor moved: the comparison would be trivial"


def supports_deterministic_switch() -> bool:
    """True once TrainConfig has `deterministic` (the engine's own switch); else the runner sets the flags itself."""
    return "deterministic" in {f.name for f in dataclasses.fields(TrainConfig)}


def cuda_trial_dict(root, out, **sections) -> dict:
    """The engine tests' tiny base-to-novel trial, on CUDA, deterministic where the engine offers it."""
    d = tiny_trial_dict(root, out, device="cuda", **sections)
    if supports_deterministic_switch():
        d["train"] = {**d["train"], "deterministic": True}
    return d


def trial_env() -> dict[str, str]:
    """The environment of a trial subprocess (tests.support.child_env) with cuBLAS's deterministic workspace."""
    return child_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
