"""Fused groups on the orchestrator side (docs/fusion.md): which of a stage's trials share one Tune trial, how large a
group may be (`resources.fuse`, or sized to the device's memory), a group's estimated peak memory, and its payload.

Membership is never identity: every member keeps its own trial id, MLflow run, Optuna trial and resume decision,
and `--resume` regroups whatever is left to run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator.trials import Trial

# `fuse: auto` on a CPU: a small step is bound by per-operation overhead, which fusion amortises, but a fused step
# over many sequences is bound by arithmetic and memory traffic, and then costs as much as its members one after
# another, or more (benchmarks/RESULTS.md, trial fusion: the tiny model fuses 8 members at batch 4 over 3 classes at
# ~3x, and gains nothing at 50 classes). So up to 8 members, while the group's images and class texts per step stay
# within CPU_SEQUENCES.
CPU_AUTO = 8
CPU_SEQUENCES = 128
MAX_AUTO = 16
# Of a trial's GPU memory, what a group may plan to use (the rest: allocator fragmentation, CUDA context, NCCL).
MEMORY_SHARE = 0.8
GIB = 1024 ** 3


@dataclass(frozen=True)
class TrialGroup:
    """Member trials that run as one fused group in one Tune trial (one member: a trial alone)."""

    members: tuple[Trial, ...]

    @property
    def group_id(self) -> str:
        """The Tune trial's name: the first member's id (alone: exactly it), plus the group size."""
        first = self.members[0].trial_id
        return first if len(self.members) == 1 else f"{first}-x{len(self.members)}"

    def payload(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "members": [t.payload() for t in self.members]}

    @classmethod
    def from_payload(cls, d: Mapping[str, Any]) -> "TrialGroup":
        return cls(tuple(Trial.from_payload(m) for m in d["members"]))


def group_size(spec, cfg, n_classes: int) -> int:
    """How many members a group of trials like `cfg` may have: `resources.fuse`, or with `auto` up to 16; on a GPU
    never more than the estimated peak memory fits in the trial's share (`gpu_memory_gib` x `gpus_per_trial`), so a
    group that would not fit is split rather than failed; with `auto` on a CPU up to 8 while the group's sequences
    per step (images and class texts) stay within CPU_SEQUENCES."""
    r = spec.resources
    if r.gpus_per_trial <= 0:
        if r.fuse != "auto":
            return int(r.fuse)
        return max(1, min(CPU_AUTO, CPU_SEQUENCES // (cfg.train.batch_size + n_classes)))
    return min(MAX_AUTO if r.fuse == "auto" else int(r.fuse), memory_fit(spec, cfg, n_classes))


def memory_fit(spec, cfg, n_classes: int) -> int:
    """The most members (at least 1, at most max(16, fuse)) whose estimated peak fits the trial's GPU share."""
    r = spec.resources
    budget = MEMORY_SHARE * r.gpu_memory_gib * GIB * r.gpus_per_trial
    top = max(MAX_AUTO, int(r.fuse) if r.fuse != "auto" else 1)
    base, per_member = estimate_peak_bytes(cfg, 0, n_classes), estimate_peak_bytes(cfg, 1, n_classes)
    per_member -= base
    return max(1, min(top, int((budget - base) // per_member) if per_member > 0 else top))


def plan_groups(trials: Sequence[Trial], spec, class_count) -> tuple[list[TrialGroup], dict[str, str]]:
    """The stage's trials in groups, in plan order: trials with one fusion key (hisf.engine.group) share groups of
    at most `group_size`, as even as possible. Returns the groups and, per trial that runs alone, why.

    `class_count(dataset) -> int` gives a dataset's class count (for the memory estimate)."""
    from hisf.engine.group import fusion_key, why_alone

    buckets: dict[str, list[Trial]] = {}
    for t in trials:
        buckets.setdefault(fusion_key(t.config), []).append(t)
    groups: list[TrialGroup] = []
    alone: dict[str, str] = {}
    gpu = spec.resources.gpus_per_trial > 0
    for members in buckets.values():
        cfg = members[0].config
        reason = why_alone(cfg)
        size = 1 if reason else group_size(spec, cfg, train_classes(cfg, class_count(cfg.data.dataset)))
        n = math.ceil(len(members) / size)
        for i in range(n):
            chunk = members[i * len(members) // n:(i + 1) * len(members) // n]
            groups.append(TrialGroup(tuple(chunk)))
            if len(chunk) == 1:
                t = chunk[0]
                alone[t.trial_id] = reason or (
                    f"resources.fuse is {spec.resources.fuse}" if spec.resources.fuse in (1, "1") else
                    "one member fills its estimated share of the device's memory" if size == 1 and gpu else
                    "one member's step already holds the images and class texts a fused CPU step may" if size == 1 else
                    "no other trial of the stage shares its shapes and settings" if len(members) == 1 else
                    f"its {len(members)} compatible trials split into groups of at most {size}")
    order = {t.trial_id: i for i, t in enumerate(trials)}
    groups.sort(key=lambda g: order[g.members[0].trial_id])
    return groups, alone


def train_classes(cfg, n_classes: int) -> int:
    return math.ceil(n_classes / 2) if cfg.protocol == "base2new" else n_classes


def estimate_peak_bytes(cfg, members: int, n_classes: int) -> int:
    """A group's planned peak device memory: the frozen backbone once, plus per member its activations (B images and
    C class texts through both towers, kept for the backward) and its prompt-side state.

    Activations per sequence and transformer layer: s·h·(34 + 5·a·s/h) bytes in 16-bit (Korthikanti et al., 2022,
    "Reducing Activation Recomputation in Large Transformer Models", eq. 1), twice that in fp32; prompt-side
    parameters at 16 bytes each (fp32 value, gradient and two Adam moments)."""
    from hisf.model.backbone_shape import backbone_shape, resolve_model_cfg
    from hisf.model.facts import METHODS

    shape = backbone_shape(cfg.backbone)
    vision = resolve_model_cfg(cfg.backbone)["vision_cfg"]
    image, patch = _side(vision.get("image_size", 224)), _side(vision.get("patch_size", 16))
    n_ctx = cfg.method.n_ctx if cfg.method.n_ctx is not None else METHODS[cfg.method.name].n_ctx
    act = 1.0 if cfg.train.precision in ("fp16", "bf16") else 2.0
    weight = 4 if cfg.backbone.precision == "fp32" else 2

    def per_sequence(tokens: int, width: int, layers: int) -> float:
        heads = max(1, width // 64)
        return layers * tokens * width * (34 + 5 * heads * tokens / width) * act

    vision_tokens = (image // patch) ** 2 + 1 + n_ctx
    text_tokens = min(shape.context_length, n_ctx + 16)  # [SOS], the prompt, a class name, ".", [EOS]
    backbone = 12 * (shape.vision_layers * shape.vision_width ** 2 + shape.text_layers * shape.text_width ** 2)
    backbone += 49408 * shape.text_width  # the token embedding
    prompts = 16 * len(cfg.method.prompt_layers) * (n_ctx * (shape.text_width + shape.vision_width)
                                                   + 2 * shape.text_width * shape.vision_width)
    per_member = (cfg.train.batch_size * per_sequence(vision_tokens, shape.vision_width, shape.vision_layers)
                  + n_classes * per_sequence(text_tokens, shape.text_width, shape.text_layers) + prompts)
    return int(backbone * weight + members * per_member)


def _side(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)
