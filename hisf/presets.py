"""The optimiser presets as data (docs/method.md): the optimiser, its lr and weight decay, how parameters group.

Importable without torch: `hisf/config.py` checks `train.preset` against it before anything heavy loads, and
`hisf/engine/optim.py` builds each preset's optimiser from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    optimizer: str  # "sgd" | "adamw" | "adam" (torch.optim.SGD / AdamW / Adam)
    lr: float  # when train.lr is unset
    weight_decay: float  # when train.weight_decay is unset
    # True: parameter groups (prompts and label embeddings at lr * train.prompt_lr_mult, weight decay on
    # projection matrices only); False: one group, the same lr and weight decay for every trainable tensor.
    grouped: bool
    betas: tuple[float, float] | None = None
    eps: float | None = None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # paper §4.1 (MaPLe's recipe): SGD 0.0035, momentum 0.9 (train.momentum), weight decay 5e-4.
    Preset("paper", "sgd", lr=0.0035, weight_decay=5e-4, grouped=False),
    # paper §3.5 names AdamW without values; these are ours: projection/fusion lr 1e-3 (prompts get
    # `prompt_lr_mult` times it), weight decay 0.01 on projection matrices only.
    Preset("adamw", "adamw", lr=1e-3, weight_decay=0.01, grouped=True),
    # docs/method.md, the released configs (Dassl's Adam): lr 0.0025, betas 0.9/0.999, eps 1e-3, coupled L2 weight
    # decay 5e-4 on every trainable tensor, one group (batch 32 recommended: set train.batch_size).
    Preset("hicropl", "adam", lr=0.0025, weight_decay=5e-4, grouped=False, betas=(0.9, 0.999), eps=1e-3),
)}
