"""Optimiser presets (docs/method.md: `paper` SGD, `adamw` with parameter groups, `hicropl` Adam) and the schedule."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from hisf.config import ConfigError, TrainConfig

# paper §4.1 (MaPLe's recipe): SGD 0.0035, momentum 0.9, weight decay 5e-4.
PAPER_LR = 0.0035
PAPER_WEIGHT_DECAY = 5e-4
# paper §3.5 names AdamW without values; these are ours: projection/fusion lr 1e-3 (prompts get
# `prompt_lr_mult` times it), weight decay 0.01 on projection matrices only.
ADAMW_LR = 1e-3
ADAMW_WEIGHT_DECAY = 0.01
# docs/method.md, the released configs (Dassl's Adam): lr 0.0025, betas 0.9/0.999, eps 1e-3, coupled L2 weight
# decay 5e-4 on every trainable tensor, one group (batch 32 recommended: set train.batch_size).
HICROPL_LR = 0.0025
HICROPL_WEIGHT_DECAY = 5e-4
HICROPL_BETAS = (0.9, 0.999)
HICROPL_EPS = 1e-3
PRESET_LR = {"paper": PAPER_LR, "adamw": ADAMW_LR, "hicropl": HICROPL_LR}
SINGLE_GROUP_WD = {"paper": PAPER_WEIGHT_DECAY, "hicropl": HICROPL_WEIGHT_DECAY}

GROUP_NAMES = ("prompts", "projections", "fusion", "label_embeddings")


def base_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else PRESET_LR[cfg.preset]


def _unique_trainable(params: Sequence[torch.nn.Parameter], seen: set[int]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def build_param_groups(cfg: TrainConfig, groups: Mapping[str, Sequence[torch.nn.Parameter]]) -> list[dict]:
    """Turn a PromptModel's `param_groups()` into optimiser groups for the preset.

    `paper` / `hicropl`: one group, the same lr and weight decay for every trainable tensor (MaPLe's and
    HiCroPL's released recipes).
    `adamw` (§3.5): prompt matrices (and label embeddings, which live in the same token-embedding space)
    at lr * prompt_lr_mult; projection and fusion weights at lr; weight decay only on projection
    matrices (2-D weights in `projections`, not their biases).
    """
    unknown = sorted(set(groups) - set(GROUP_NAMES))
    if unknown:
        raise ValueError(f"param_groups(): unknown group {unknown[0]!r}; expected names from {list(GROUP_NAMES)}")
    seen: set[int] = set()
    named = {k: _unique_trainable(groups.get(k, ()), seen) for k in GROUP_NAMES}
    lr = base_lr(cfg)
    if cfg.preset in SINGLE_GROUP_WD:
        wd = cfg.weight_decay if cfg.weight_decay is not None else SINGLE_GROUP_WD[cfg.preset]
        params = [p for k in GROUP_NAMES for p in named[k]]
        return [{"name": "all", "params": params, "lr": lr, "weight_decay": wd}] if params else []
    wd = cfg.weight_decay if cfg.weight_decay is not None else ADAMW_WEIGHT_DECAY
    prompt_lr = lr * cfg.prompt_lr_mult
    spec = [
        ("prompts", named["prompts"], prompt_lr, 0.0),
        ("label_embeddings", named["label_embeddings"], prompt_lr, 0.0),
        ("projection_weights", [p for p in named["projections"] if p.ndim >= 2], lr, wd),
        ("projection_biases", [p for p in named["projections"] if p.ndim < 2], lr, 0.0),
        ("fusion", named["fusion"], lr, 0.0),
    ]
    return [{"name": n, "params": ps, "lr": g_lr, "weight_decay": g_wd} for n, ps, g_lr, g_wd in spec if ps]


def shares_storage(params: Sequence[torch.nn.Parameter]) -> bool:
    """True when two parameters are views of one storage (HiCroPL's `mapping: released` aliases)."""
    ptrs = [p.untyped_storage().data_ptr() for p in params if p.numel()]  # empty tensors have no storage to share
    return len(set(ptrs)) < len(ptrs)


def build_optimizer(cfg: TrainConfig, groups: Mapping[str, Sequence[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The preset's optimiser over `build_param_groups`; aliased parameters are each their own entry.

    Parameters that share a storage (distinct objects, so `_unique_trainable` keeps each, as Dassl's Adam
    over `model.parameters()` does) get one update each, applied one after the other: the per-tensor
    (for-loop) implementation is forced for them, because the multi-tensor one reads every parameter
    before writing any (and on CUDA one kernel writing one storage from several blocks races).
    """
    param_groups = build_param_groups(cfg, groups)
    if not param_groups:
        raise ConfigError("method: has no trainable parameters; nothing for the optimiser to train (use epochs: 0)")
    sequential = {"foreach": False} if shares_storage([p for g in param_groups for p in g["params"]]) else {}
    if cfg.preset == "paper":
        return torch.optim.SGD(param_groups, lr=base_lr(cfg), momentum=cfg.momentum, **sequential)
    if cfg.preset == "hicropl":
        # torch's Adam weight_decay is the coupled L2 term (added to the gradient), as Dassl's Adam.
        return torch.optim.Adam(param_groups, lr=base_lr(cfg), betas=HICROPL_BETAS, eps=HICROPL_EPS, **sequential)
    return torch.optim.AdamW(param_groups, lr=base_lr(cfg), **sequential)


def lr_factor(epoch: int, cfg: TrainConfig, group_lr: float) -> float:
    """Multiplier of a group's lr at `epoch` (0-based), stepped once per epoch as Dassl does.

    Epochs < warmup_epochs run at the constant `warmup_lr` (MaPLe: 1 epoch at 1e-5); after that a
    cosine over `epochs` restarts from the base lr: epoch e >= W uses cos-annealing step e - W with
    T_max = epochs (Dassl's ConstantWarmupScheduler wrapped around CosineAnnealingLR(max_epoch)).
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / group_lr
    t = epoch - cfg.warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * t / max(1, cfg.epochs)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch schedule: call `.step()` once at the end of each epoch."""
    lambdas = [lambda e, lr=g["lr"]: lr_factor(e, cfg, lr) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
