"""Optimisers from the presets (hisf/presets.py, docs/method.md: `paper` SGD, `adamw` with parameter groups,
`hicropl` Adam), the warm-up + cosine schedule, and each member's optimiser over its slices of a model's stacked
parameters (docs/fusion.md)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from hisf.config import ConfigError, TrainConfig
from hisf.model.facts import PARAM_GROUPS
from hisf.presets import PRESETS


def base_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else PRESETS[cfg.preset].lr


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
    unknown = sorted(set(groups) - set(PARAM_GROUPS))
    if unknown:
        raise ValueError(f"param_groups(): unknown group {unknown[0]!r}; expected names from {list(PARAM_GROUPS)}")
    seen: set[int] = set()
    named = {k: _unique_trainable(groups.get(k, ()), seen) for k in PARAM_GROUPS}
    preset, lr = PRESETS[cfg.preset], base_lr(cfg)
    wd = cfg.weight_decay if cfg.weight_decay is not None else preset.weight_decay
    if not preset.grouped:
        params = [p for k in PARAM_GROUPS for p in named[k]]
        return [{"name": "all", "params": params, "lr": lr, "weight_decay": wd}] if params else []
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
    # The multi-tensor (foreach) implementation, on every device: one call per update for all of a trial's tensors
    # (a fused group steps K optimisers per step, so per-tensor Python loops would grow with K).
    sequential = {"foreach": not shares_storage([p for g in param_groups for p in g["params"]])}
    preset = PRESETS[cfg.preset]
    if preset.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=base_lr(cfg), momentum=cfg.momentum, **sequential)
    if preset.optimizer == "adam":
        # torch's Adam weight_decay is the coupled L2 term (added to the gradient), as Dassl's Adam.
        return torch.optim.Adam(param_groups, lr=base_lr(cfg), betas=preset.betas, eps=preset.eps, **sequential)
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


def member_views(model, member: int) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """Member `member`'s views of the model's stacked trainable parameters, by parameter group (`param_groups()`),
    and the (stacked, view) pairs. A view (`p.detach()[member]`, requiring grad) has a solo trial's shape and shares
    the stacked parameter's storage: torch's own optimiser stepping the views is the member's solo optimiser."""
    views: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def view(p: torch.nn.Parameter) -> torch.Tensor:
        if id(p) not in views:
            views[id(p)] = (p, p.detach()[member].requires_grad_(True))
        return views[id(p)][1]

    groups = {g: [view(p) for p in ps] for g, ps in model.param_groups().items()}
    return groups, list(views.values())


def member_optimizer(model, member: int, cfg: TrainConfig):
    """(optimizer, scheduler, pairs in the optimiser's order) of member `member` under its own train config."""
    groups, pairs = member_views(model, member)
    optimizer = build_optimizer(cfg, groups)
    stacked = {id(v): p for p, v in pairs}
    ordered = [(stacked[id(v)], v) for g in optimizer.param_groups for v in g["params"]]
    return optimizer, build_scheduler(optimizer, cfg), ordered
