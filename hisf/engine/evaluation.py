"""Evaluation: top-1 accuracy summed over ranks, each protocol's test sets (base/novel, all, targets) and the
harmonic mean (docs/protocols.md)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from hisf.engine.distributed import DistEnv, all_reduce_sum
from hisf.engine.trial_data import check_labels

if TYPE_CHECKING:
    from hisf.engine.trial_data import TrialData


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N) (docs/protocols.md, base-to-novel); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


@torch.no_grad()
def count_correct(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[int, int]:
    """(correct, total) top-1 predictions of this rank's batches; logits over the model's current class set."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    try:
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images, shared=True)  # [K, B, C]: every member scores the same images
            correct += (logits[0].argmax(dim=-1) == labels).sum()
            total += labels.numel()
    finally:
        model.train(was_training)
    return int(correct.item()), total


def accuracy(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Top-1 accuracy in percent over every rank's share of the split (sums all-reduced, so ranks agree).

    Evaluation loaders give every sample to exactly one rank and ranks may differ by a batch, so the
    counts are reduced once after the loop rather than per batch.
    """
    correct, total = count_correct(model, batches, env.device, autocast)
    t = torch.tensor([correct, total], dtype=torch.float64, device=env.device)
    correct_all, total_all = all_reduce_sum(t, env).tolist()
    if total_all == 0:
        raise ValueError("evaluation split is empty on every rank; nothing to score")
    return 100.0 * correct_all / total_all


def evaluate_protocol(model: torch.nn.Module, data: "TrialData", env: DistEnv,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Test accuracy of every evaluation set of the protocol (`data.evals`: base and novel, all, or the source and
    each target), each scored with only its own class names as candidates; `hm` for base-to-novel."""
    out: dict[str, float] = {}
    for ev in data.evals:
        model.set_classnames(ev.subset.classnames, template=ev.template, dataset=ev.dataset or None)
        check_labels(ev.subset, len(model.classnames), ev.metric)
        out[ev.metric] = accuracy(model, data.loader(ev.subset), env, autocast)
    if "base_acc" in out:
        out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
    return out
