"""Building a group for its run (docs/fusion.md): every member's data, the model with one slice per member, each
member's optimiser over its slice, and the storage dtype of the shared backbone."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from hisf.config import ConfigError, TrialConfig
from hisf.engine import checkpoint as ckpt
from hisf.engine.callbacks import TrialCallback, listeners
from hisf.engine.distributed import DistEnv, check_device
from hisf.engine.member import Member
from hisf.engine.step import (NanGuard, Precision, compile_losses, compile_stats, release_compiled, resolve_precision,
                              seed_everything)
from hisf.engine.trial_data import check_labels, open_trial_data
from hisf.model.backbone import load_backbone

log = logging.getLogger("hisf.engine")


@dataclass
class Group:
    """A built group: the shared model, ranks and precision, and its members in the order of the model's member axis
    (`members` shrinks as members leave; `everyone` keeps them all, in the order they were given)."""

    env: DistEnv
    precision: Precision
    model: Any
    everyone: list[Member]
    members: list[Member]
    device_name: str
    steps_per_epoch: int = 0
    eager_fallbacks: int = 0  # Dynamo's process-wide count before this group (train.compile)
    stepped: bool = False  # a training step has run (the first one compiles, under train.compile)
    group_callbacks: list = dataclasses.field(default_factory=list)  # GroupCallbacks this rank calls

    def stacked(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.model.member_parameters() if p.requires_grad]


def build_group(cfgs: list[TrialConfig], callbacks: list[list[TrialCallback]], env: DistEnv) -> Group:
    """Open every member's data (each data error is raised here, before the model), then build the model with one
    slice per member and each member's optimiser over its slice."""
    from hisf.model.methods import build_method  # imports open_clip: only where a trial runs

    tc = cfgs[0].train
    device_name = check_device(env.device)  # an assigned GPU torch cannot use fails here, not as a slow CPU trial
    precision = resolve_precision(tc.precision, env.device)
    members = []
    for cfg, cbs in zip(cfgs, callbacks):
        data = open_trial_data(cfg, env)
        members.append(Member(cfg, listeners(cbs, env.is_main), data,
                              ckpt.ResumeIdentity.of(cfg, env.world_size, data.fingerprints),
                              NanGuard(cfg.train.max_nonfinite_steps)))
    _check_same_data(members, env)
    for m in members:
        m.call("on_trial_start", {**m.data.describe(), "precision": precision.name,
                                  "compile": tc.compile_mode if tc.compile else "eager", "device_name": device_name,
                                  "group_size": len(members)})
    seed_everything(cfgs[0].seed)
    first = members[0]
    backbone = load_backbone(_backbone_storage(cfgs[0], precision))
    model = build_method(cfgs[0].method, backbone, first.data.train.classnames, template=first.data.template,
                         dataset=cfgs[0].data.dataset, members=[c.method for c in cfgs],
                         seeds=[c.seed for c in cfgs]).to(env.device)
    for m in members:
        m.data.bind(backbone, m.cfg)
        for what, subset in (("data.dataset train", m.data.train), ("data.dataset val", m.data.val)):
            check_labels(subset, len(model.classnames), what)
    fallbacks = 0
    if tc.compile:
        release_compiled(None)  # a fresh Dynamo cache per group: earlier groups' class sets never count here
        compile_losses(model, tc.compile_mode)
        fallbacks = compile_stats()["eager_fallbacks"]
    trains = bool(model.num_trainable())
    for i, m in enumerate(members):
        m.epochs = m.cfg.train.epochs if trains else 0
        m.bind(model, i, precision)
    steps = len(first.data.train_loader(epoch=0)) if any(m.epochs for m in members) else 0
    return Group(env, precision, model, list(members), members, device_name, steps, fallbacks)


def _check_same_data(members: list[Member], env: DistEnv) -> None:
    """Members step together and score the same test sets: equal steps per epoch and identical evaluation sets."""
    first = members[0]
    batch = first.cfg.train.batch_size * env.world_size
    for i, m in enumerate(members[1:], start=1):
        if len(m.data.train) // batch != len(first.data.train) // batch:
            raise ConfigError(f"group: member {i} ({m.out_dir}) draws {len(m.data.train)} training samples, member 0 "
                              f"{len(first.data.train)}: their epochs would not end together; run them in separate groups")
        if [(e.metric, e.subset.keys) for e in m.data.evals] != [(e.metric, e.subset.keys) for e in first.data.evals]:
            raise ConfigError(f"group: member {i} ({m.out_dir}) evaluates other test sets than member 0")


def _backbone_storage(cfg: TrialConfig, precision: Precision):
    """The backbone config to load: as configured, except a backbone stored in fp16 under the CPU's bf16
    fallback for `precision: fp16`, which is stored in bf16 to match (no GradScaler guards fp16 gradients
    there; TrialConfig.validate refuses fp16 storage with bf16/fp32 precision outright)."""
    if cfg.backbone.precision == "fp16" and precision.name != "fp16":
        log.warning("backbone.precision fp16 with train.precision fp16 on %s, which runs %s without a GradScaler: "
                    "storing the backbone in %s instead", precision.device_type, precision.name, precision.name)
        return dataclasses.replace(cfg.backbone, precision=precision.name)
    return cfg.backbone
