"""Who may share a fused group (docs/fusion.md): the keys members may differ in, the fusion key, and why a trial
runs alone.

A group is K trials trained as one process over one forward of the frozen backbone. Members must agree on every
key that shapes the shared computation; they may differ in the keys below, which only change what each member's
own optimiser, schedule, loss weights, data stream or files do.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from hisf.config import ConfigError, TrialConfig
from hisf.model.members import LOSS_WEIGHTS, METHOD_MEMBER_KEYS

# The keys members of one group may differ in (dotted TrialConfig keys).
MEMBER_KEYS = (
    "seed",  # each member's own few-shot draw, order, augmentation and initial prompts
    "output_dir",  # each member's own files
    *(f"method.{k}" for k in METHOD_MEMBER_KEYS),  # per-member loss weights and an initialisation switch
    # each member's own optimiser and schedule, and when it leaves the group
    "train.lr", "train.weight_decay", "train.momentum", "train.warmup_lr", "train.warmup_epochs",
    "train.prompt_lr_mult", "train.epochs", "train.max_nonfinite_steps",
)


def why_alone(cfg: TrialConfig) -> str | None:
    """Why `cfg` never shares a group, or None when it may."""
    if cfg.method.name == "hicropl" and cfg.method.mapping == "released":
        return ("HiCroPL `mapping: released` runs unfused: its forward writes its own parameters in place (and with "
                "`released_storage: shared` several of them alias one storage)")
    return None


def fusion_key(cfg: TrialConfig) -> str:
    """Trials with equal keys may share a group: the config without MEMBER_KEYS, plus which loss weights are zero
    (a zero weight leaves its term out of the graph, so members agree on it); a trial that runs alone gets a key
    of its own."""
    flat = {k: v for k, v in cfg.flatten().items() if k not in MEMBER_KEYS}
    flat.update({f"method.{k} == 0": getattr(cfg.method, k) == 0 for k in LOSS_WEIGHTS})
    if why_alone(cfg):
        flat["alone"] = cfg.output_dir
    return json.dumps(flat, sort_keys=True, default=str)


def check_group(cfgs: Sequence[TrialConfig]) -> None:
    """A ConfigError naming the first member and key that keep `cfgs` from being one group."""
    if not cfgs:
        raise ConfigError("group: expected at least one member trial config")
    if len(cfgs) == 1:
        return
    reason = next((why_alone(c) for c in cfgs if why_alone(c)), None)
    if reason:
        raise ConfigError(f"group: {len(cfgs)} members, but {reason}")
    base = _shared(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], start=1):
        other = _shared(cfg)
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"group: member {i} ({cfg.output_dir}) has {k} = {other.get(k)!r}, member 0 "
                              f"{base.get(k)!r}; members may differ only in {list(MEMBER_KEYS)}")
    dirs = [c.output_dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"group: two members share an output_dir ({sorted(d for d in dirs if dirs.count(d) > 1)[0]})")


def _shared(cfg: TrialConfig) -> dict[str, Any]:
    return json.loads(fusion_key(cfg))
