"""Evaluation of every member of a model (docs/fusion.md): top-1 accuracy summed over ranks, each protocol's test
sets (base/novel, all, targets) and the harmonic mean (docs/protocols.md)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

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
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """(correct [K], totals per member) top-1 predictions of this rank's batches over the model's class set.

    `shared`: one loader whose images every member scores (a test split). Else one loader per member (its own
    validation draw; None for a member with nothing to score): batch i of every member runs in one forward,
    shorter or missing batches padded with blank images whose predictions are not counted."""
    was_training = model.training
    model.eval()
    k = getattr(model, "members", 1)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    totals = [0] * k
    try:
        if shared:
            for images, labels in batches:
                with autocast():
                    logits = model(images.to(device, non_blocking=True), shared=True)  # [K, B, C]
                correct += (logits.argmax(dim=-1) == labels.to(device, non_blocking=True)[None]).sum(dim=1)
                totals = [t + labels.numel() for t in totals]
        else:
            for images, labels, counts in _member_batches(batches):
                with autocast():
                    logits = model(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
                correct += ((logits.argmax(dim=-1) == labels) & (labels >= 0)).sum(dim=1)
                totals = [t + n for t, n in zip(totals, counts)]
    finally:
        model.train(was_training)
    return correct, totals


def _member_batches(loaders: Sequence[Iterable | None]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Batch i of every member's loader as one member-major batch: images [K·b, ...], labels [K, b] (-1: padding)."""
    iters = [iter(b) if b is not None else None for b in loaders]
    while True:
        items = [next(it, None) if it is not None else None for it in iters]
        present = [x for x in items if x is not None]
        if not present:
            return
        b, shape, dtype = max(x[0].shape[0] for x in present), present[0][0].shape[1:], present[0][0].dtype
        images, labels, counts = [], [], []
        for x in items:
            n = 0 if x is None else x[0].shape[0]
            pad = torch.zeros(b - n, *shape, dtype=dtype)
            images.append(pad if x is None else torch.cat([x[0], pad]))
            labels.append(torch.cat([x[1] if x is not None else torch.zeros(0, dtype=torch.long),
                                     torch.full((b - n,), -1, dtype=torch.long)]))
            counts.append(n)
        yield torch.cat(images), torch.stack(labels), counts


def accuracy(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
) -> list[float]:
    """Top-1 accuracy in percent of every member of the model (its member axis) over every rank's share of the
    split (sums all-reduced, so ranks agree); `shared` and `batches` as in count_correct. A member with nothing
    scored gets NaN.

    Evaluation loaders give every sample to exactly one rank and ranks may differ by a batch, so the
    counts are reduced once after the loop rather than per batch.
    """
    correct, totals = count_correct(model, batches, env.device, autocast, shared)
    t = torch.cat([correct.to(torch.float64), torch.tensor(totals, dtype=torch.float64, device=env.device)])
    values = all_reduce_sum(t, env).tolist()
    k = len(totals)
    if not any(values[k:]):
        raise ValueError("evaluation split is empty on every rank; nothing to score")
    return [100.0 * c / n if n else float("nan") for c, n in zip(values[:k], values[k:])]


def evaluate_protocol(model: torch.nn.Module, data: "TrialData", env: DistEnv,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                      ) -> list[dict[str, float]]:
    """Test accuracy, per member of the model, of every evaluation set of the protocol (`data.evals`: base and
    novel, all, or the source and each target; the same sets for every member of a group), each scored with only
    its own class names as candidates, in one pass per batch for all members; `hm` for base-to-novel."""
    out: list[dict[str, float]] = [{} for _ in range(getattr(model, "members", 1))]
    for ev in data.evals:
        model.set_classnames(ev.subset.classnames, template=ev.template, dataset=ev.dataset or None)
        check_labels(ev.subset, len(model.classnames), ev.metric)
        for metrics, acc in zip(out, accuracy(model, data.loader(ev.subset), env, autocast)):
            metrics[ev.metric] = acc
    for metrics in out:
        if "base_acc" in metrics:
            metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    return out
