"""What a stage costs, for the dry run: device hours from a per-backbone step-cost model, trial by trial or in fused
groups (docs/fusion.md), and the measured figures the model rests on.

A training step costs max(floor, images / rate) seconds on one device: below `floor` the step is bound by kernel
launches and host work (a trial at batch 4 on a GPU), above it by arithmetic; a fused group's step processes every
member's batch at once, so K members at batch B cost what one step of K·B images costs.
"""

from __future__ import annotations

import math

from orchestrator.trials import class_count, search_groups

# backbone -> (floor seconds per step, images per second), and where the figures come from.
STEP_COST = {
    # MaPLe's own training step (its code, random ViT-B/16 weights, fp16) on one H100, as measured for issue 17:
    # 68 img/s at batch 4 (0.059 s/step: the floor) and 592 img/s at batch 32 (the rate).
    "ViT-B-16": (4 / 68, 592.0),
    # Not measured: ViT-B/16's figures scaled by the tokens per image (49 vs 196: 4x the rate) and by the depth and
    # width (ViT-L/14: 24 layers of width 1024 over 256 tokens, ~4.5x the arithmetic and 2x the launches).
    "ViT-B-32": (4 / 68, 4 * 592.0),
    "ViT-L-14": (2 * 4 / 68, 592.0 / 4.5),
    # The tiny test backbone on this project's 2-core CPU (benchmarks/fusion.py, benchmarks/RESULTS.md).
    "hisf-tiny": (0.02, 1000.0),
}
TEST_IMAGES_PER_CLASS = 50  # a rough test split size when the build is not there to count


def step_seconds(backbone: str, images: int) -> float:
    floor, rate = STEP_COST.get(backbone, STEP_COST["ViT-B-16"])
    return max(floor, images / rate)


def group_seconds(spec, cfgs: list) -> float:
    """Device seconds of one group of trials `cfgs` (one: a trial alone): the members step together for as many
    epochs as the longest needs, then evaluate the shared test split together (forward only: a third of a step)."""
    cfg = cfgs[0]
    k, b = len(cfgs), cfg.train.batch_size
    n_classes = class_count(spec.data.root, cfg.data.dataset)
    train_classes = math.ceil(n_classes / 2) if cfg.protocol == "base2new" else n_classes
    epochs = 0 if cfg.method.name == "zeroshot" else max(c.train.epochs for c in cfgs)
    workers = spec.resources.workers_per_trial
    steps = epochs * math.ceil(train_classes * cfg.data.shots / (b * workers))
    step = step_seconds(cfg.backbone.name, k * b)
    eval_batches = math.ceil(n_classes * TEST_IMAGES_PER_CLASS / 100)
    evaluate = eval_batches * step_seconds(cfg.backbone.name, k * 100) / 3
    return steps * step + evaluate


def estimate_hours(spec, trials: list, n_search: int = 0, groups: list | None = None) -> dict[str, float]:
    """Device hours of `trials` (+ the search stage's trials when `n_search`), run as `groups` (TrialGroups of them;
    None: every trial alone). Class counts come from built data (`ROOT/<key>/info.json`), else 100 are assumed."""
    runs = [[t.config for t in g.members] for g in groups] if groups is not None else [[t.config] for t in trials]
    total = sum(group_seconds(spec, cfgs) for cfgs in runs)
    if n_search and spec.search is not None:
        from orchestrator.groups import group_size, train_classes

        for g in search_groups(spec):
            k = 1 if groups is None else min(spec.search.n_trials, group_size(
                spec, g.config, train_classes(g.config, class_count(spec.data.root, g.config.data.dataset))))
            total += math.ceil(spec.search.n_trials / k) * group_seconds(spec, [g.config] * k)
    devices = max(spec.resources.gpus_per_trial, 0) * spec.resources.workers_per_trial
    return {"trial_hours": total / 3600, "gpu_hours": total * devices / 3600}
