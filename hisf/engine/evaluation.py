"""Evaluation of every member of a model (docs/fusion.md): one confusion count per member and split (true label x
top-1 prediction, on the device, summed over ranks once), from which top-1 accuracy, per-class accuracy and the
confusion matrix all come; each protocol's test sets (base/novel, all, targets) and the harmonic mean
(docs/protocols.md)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch

from hisf.engine.distributed import DistEnv, all_reduce_sum
from hisf.engine.trial_data import check_labels

if TYPE_CHECKING:
    from hisf.engine.trial_data import TrialData


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N) (docs/protocols.md, base-to-novel); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


@dataclass
class SplitScores:
    """What one evaluated split gives every member: `confusion` [K, C, C] int64 on the host (row: true label, column:
    top-1 prediction) over every rank's share, with the split's result key and class names."""

    metric: str  # result key: val_acc, base_acc, novel_acc, acc, target/<key>
    classnames: tuple[str, ...]
    dataset: str
    confusion: torch.Tensor

    def accuracy(self) -> list[float]:
        """Top-1 accuracy in percent per member: the trace over the total (NaN for a member with nothing scored)."""
        return confusion_accuracy(self.confusion)


def confusion_accuracy(confusion: torch.Tensor) -> list[float]:
    """Top-1 accuracy in percent per member of a [K, C, C] count: 100 · trace / total; NaN where the total is 0."""
    correct = confusion.diagonal(dim1=1, dim2=2).sum(-1).tolist()
    totals = confusion.sum((1, 2)).tolist()
    return [100.0 * c / n if n else float("nan") for c, n in zip(correct, totals)]


@torch.no_grad()
def confusion_counts(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
    n_classes: int | None = None,
) -> torch.Tensor:
    """[K, C, C] int64 on `device`: this rank's top-1 predictions counted by (member, true label, prediction) over
    the model's class set (C = `n_classes`, default the model's class names).

    `shared`: one loader whose images every member scores (a test split). Else one loader per member (its own
    validation draw; None for a member with nothing to score): batch i of every member runs in one forward,
    shorter or missing batches padded with blank images whose predictions are not counted.

    Counted in place on the device with no host sync per batch: each (member, label, prediction) triple indexes
    one cell of a flat buffer (an index_add of ones, deterministic on CUDA too); padding and any label outside
    the class set go to one spare cell dropped at the end (check_labels refuses such labels before evaluation)."""
    was_training = model.training
    model.eval()
    k = getattr(model, "members", 1)
    c = len(model.classnames) if n_classes is None else n_classes
    cells = k * c * c
    flat = torch.zeros(cells + 1, dtype=torch.int64, device=device)
    offsets = (torch.arange(k, device=device) * (c * c))[:, None]  # [K, 1]

    def count(logits: torch.Tensor, labels: torch.Tensor) -> None:
        preds = logits.argmax(dim=-1)  # [K, B]
        labels = labels.expand_as(preds)
        valid = (labels >= 0) & (labels < c)
        index = torch.where(valid, offsets + labels * c + preds, cells)
        flat.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int64, device=device))

    try:
        if shared:
            for images, labels in batches:
                with autocast():
                    logits = model(images.to(device, non_blocking=True), shared=True)  # [K, B, C]
                count(logits, labels.to(device, non_blocking=True)[None])
        else:
            for images, labels, _ in _member_batches(batches):
                with autocast():
                    logits = model(images.to(device, non_blocking=True))
                count(logits, labels.to(device, non_blocking=True))  # [K, b], -1: padding
    finally:
        model.train(was_training)
    return flat[:cells].view(k, c, c)


def count_correct(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """(correct [K], totals per member) top-1 predictions of this rank's batches over the model's class set: the
    trace and total of confusion_counts (`shared` and `batches` as there)."""
    conf = confusion_counts(model, batches, device, autocast, shared)
    return conf.diagonal(dim1=1, dim2=2).sum(-1), [int(n) for n in conf.sum((1, 2)).tolist()]


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


def score(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
    metric: str = "",
    dataset: str = "",
    classnames: Sequence[str] | None = None,
) -> SplitScores:
    """Every member's confusion count over every rank's share of the split (`shared` and `batches` as in
    confusion_counts), all-reduced once after the loop and brought to the host; `classnames` name its classes
    (default: the model's, as it cleaned them).

    Evaluation loaders give every sample to exactly one rank and ranks may differ by a batch, so the counts are
    reduced once after the loop rather than per batch. Raises ValueError when no rank scored anything."""
    conf = all_reduce_sum(confusion_counts(model, batches, env.device, autocast, shared), env).cpu()
    if not int(conf.sum()):
        raise ValueError("evaluation split is empty on every rank; nothing to score")
    names = getattr(model, "classnames", ()) if classnames is None else classnames
    return SplitScores(metric, tuple(names), dataset, conf)


def accuracy(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | Sequence[Iterable | None],
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    shared: bool = True,
) -> list[float]:
    """Top-1 accuracy in percent of every member of the model (its member axis) over every rank's share of the
    split (counts all-reduced, so ranks agree); `shared` and `batches` as in confusion_counts. A member with
    nothing scored gets NaN."""
    return score(model, batches, env, autocast, shared).accuracy()


def score_protocol(model: torch.nn.Module, data: "TrialData", env: DistEnv,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                   ) -> list[SplitScores]:
    """Every evaluation set of the protocol (`data.evals`: base and novel, all, or the source and each target; the
    same sets for every member of a group), each scored with only its own class names as candidates, in one pass
    per batch for all members."""
    out = []
    for ev in data.evals:
        model.set_classnames(ev.subset.classnames, template=ev.template, dataset=ev.dataset or None)
        check_labels(ev.subset, len(model.classnames), ev.metric)
        out.append(score(model, data.loader(ev.subset), env, autocast, metric=ev.metric, dataset=ev.dataset,
                         classnames=ev.subset.classnames))
    return out


def protocol_metrics(splits: Sequence[SplitScores], members: int) -> list[dict[str, float]]:
    """Per member: each split's accuracy under its result key, and `hm` for base-to-novel."""
    out: list[dict[str, float]] = [{} for _ in range(members)]
    for split in splits:
        for metrics, acc in zip(out, split.accuracy()):
            metrics[split.metric] = acc
    for metrics in out:
        if "base_acc" in metrics:
            metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["novel_acc"])
    return out


def evaluate_protocol(model: torch.nn.Module, data: "TrialData", env: DistEnv,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                      ) -> list[dict[str, float]]:
    """Test accuracy, per member of the model, of every evaluation set of the protocol (score_protocol); `hm` for
    base-to-novel."""
    return protocol_metrics(score_protocol(model, data, env, autocast), getattr(model, "members", 1))
