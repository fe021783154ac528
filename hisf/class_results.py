"""Per-class results of one evaluated split: accuracy per class and the confusion matrix, as a trial's artifacts
`eval/<split>.json` and `eval/<split>.png` (docs/interfaces.md), built from the split's confusion count.

Imports no torch at module level: reports read the records with it (written by the engine and `hisf-bench eval`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

EVAL_DIR = "eval"
FORMAT_VERSION = 1
# Result key -> artifact name; a target's `target/<key>` stays as it is (eval/target/<key>.json).
SPLIT_NAMES = {"val_acc": "val", "base_acc": "base", "novel_acc": "novel", "acc": "all"}


def split_name(metric: str) -> str:
    """The artifact name of a result key: val, base, novel, all, or target/<key>."""
    return SPLIT_NAMES.get(metric, metric)


def class_results(confusion: Any, classnames: Sequence[str], metric: str, dataset: str = "") -> dict[str, Any]:
    """The JSON record of one member's [C, C] confusion count (rows: true label, columns: prediction).

    `accuracy` is the trace over the total (the run's metric, exactly); `per_class_accuracy[c]` the correct share
    of class c's images in percent (null for a class with no image in the split); `mean_class_accuracy` their mean.
    """
    matrix = [[int(v) for v in row] for row in (confusion.tolist() if hasattr(confusion, "tolist") else confusion)]
    names = [str(n) for n in classnames]
    if len(matrix) != len(names) or any(len(row) != len(names) for row in matrix):
        raise ValueError(f"class_results: a {len(matrix)}-row confusion count for {len(names)} class names")
    support = [sum(row) for row in matrix]
    correct = [matrix[i][i] for i in range(len(names))]
    per_class = [100.0 * c / n if n else None for c, n in zip(correct, support)]
    scored = [a for a in per_class if a is not None]
    total = sum(support)
    return {
        "format": FORMAT_VERSION, "split": split_name(metric), "metric": metric, "dataset": dataset,
        "classnames": names,
        "accuracy": 100.0 * sum(correct) / total if total else None,
        "correct": sum(correct), "total": total,
        "mean_class_accuracy": sum(scored) / len(scored) if scored else None,
        "per_class_accuracy": per_class, "correct_per_class": correct, "support": support,
        "confusion": matrix, "confusion_axes": ["true label", "prediction"],
    }


def worst_classes(record: dict[str, Any], n: int) -> list[int]:
    """Indices of the n classes with the lowest per-class accuracy (ties: by index), classes with no image left out."""
    acc = record["per_class_accuracy"]
    return sorted((i for i, a in enumerate(acc) if a is not None), key=lambda i: (acc[i], i))[:n]


def write_class_results(out_dir: str | Path, confusion: Any, classnames: Sequence[str], metric: str,
                        dataset: str = "", figure: bool = True) -> dict[str, Any]:
    """Write `out_dir/eval/<split>.json` (and its heatmap `.png` unless `figure` is False); returns the record."""
    from hisf.confusion_plot import plot_confusion
    from hisf.engine.atomic import atomic_write_text

    record = class_results(confusion, classnames, metric, dataset)
    path = Path(out_dir) / EVAL_DIR / f"{record['split']}.json"
    atomic_write_text(json.dumps(record, separators=(",", ":"), allow_nan=False), path)
    if figure:
        plot_confusion(record, path.with_suffix(".png"), worst_classes(record, len(record["classnames"])))
    return record


def read_class_results(path: str | Path) -> dict[str, Any]:
    """A record written by write_class_results, checked for the keys readers use."""
    record = json.loads(Path(path).read_text())
    missing = [k for k in ("classnames", "per_class_accuracy", "confusion") if k not in record]
    if missing:
        raise ValueError(f"{path}: not a per-class results file (no {missing[0]!r})")
    return record
