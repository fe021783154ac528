"""The confusion-matrix heatmap of one split's per-class results (hisf.class_results), as a PNG: every class
named up to LABELLED_CLASSES classes, beyond that the whole matrix with its worst classes named and charted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

LABELLED_CLASSES = 100  # up to this many classes, every row and column carries its class name
WORST_MARKED = 5  # worst classes whose row names are marked in red on a labelled matrix
WORST_CHARTED = 25  # beyond LABELLED_CLASSES: the worst classes named on the matrix and charted beside it
COLOURS = "Blues"


def plot_confusion(record: dict[str, Any], path: str | Path, ranking: list[int]) -> Path:
    """Draw the record's matrix, each row as the percentage of its class's images given each prediction; `ranking`:
    class indices from the worst per-class accuracy up (hisf.class_results.worst_classes)."""
    import numpy as np

    from hisf.engine.atomic import atomic_write_bytes

    names = record["classnames"]
    conf = np.asarray(record["confusion"], dtype=np.float64).reshape(len(names), len(names))
    support = conf.sum(axis=1, keepdims=True)
    rates = np.divide(100.0 * conf, support, out=np.zeros_like(conf), where=support > 0)
    acc = record["accuracy"]
    title = (f"{record.get('dataset') or 'dataset'} · {record['split']}: top-1 "
             f"{'n/a' if acc is None else f'{acc:.2f}%'} of {record['total']} images, {len(names)} classes")
    fig = (_labelled(record, rates, ranking[:WORST_MARKED]) if len(names) <= LABELLED_CLASSES
           else _large(record, rates, ranking[:WORST_CHARTED]))
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(buf.getvalue(), path)
    return Path(path)


def _labelled(record: dict[str, Any], rates, worst: list[int]):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in a trial's process

    names, per_class = record["classnames"], record["per_class_accuracy"]
    c = len(names)
    side = min(max(4.5, 0.17 * c + 3.0), 21.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap=COLOURS, vmin=0, vmax=100, interpolation="nearest")
    # About 60% of a row's height (the axes take ~70% of the figure), between 5 and 10 points.
    size = max(5.0, min(10.0, 0.6 * 72 * 0.7 * side / c))
    ticks = list(range(c))
    ax.set_xticks(ticks, names, rotation=90, fontsize=size)
    ax.set_yticks(ticks, [f"{n} ({'–' if a is None else f'{a:.0f}%'})" for n, a in zip(names, per_class)],
                  fontsize=size)
    marked = c > 2 * WORST_MARKED
    if marked:
        labels = ax.get_yticklabels()
        for i in worst:
            labels[i].set_color("crimson")
            labels[i].set_fontweight("bold")
    if c <= 20:
        conf = record["confusion"]
        for i in range(c):
            for j in range(c):
                if conf[i][j]:
                    ax.text(j, i, str(conf[i][j]), ha="center", va="center", fontsize=size,
                            color="white" if rates[i][j] > 55 else "black")
    ax.set_xlabel("prediction")
    ax.set_ylabel(f"true label (per-class accuracy{f'; the {WORST_MARKED} worst in red' if marked else ''})")
    fig.colorbar(image, ax=ax, shrink=0.7, label="% of the class's images")
    return fig


def _large(record: dict[str, Any], rates, worst: list[int]):
    from matplotlib.figure import Figure

    names, per_class, conf = record["classnames"], record["per_class_accuracy"], record["confusion"]
    fig = Figure(figsize=(17, 9.5), dpi=100, layout="constrained")
    ax, bars = fig.subplots(1, 2, width_ratios=[1.15, 1])
    image = ax.imshow(rates, cmap=COLOURS, vmin=0, vmax=100, interpolation="antialiased", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks(worst, [names[i] for i in worst], fontsize=6, color="crimson")
    for i in worst:
        ax.axhline(i, color="crimson", linewidth=0.4, alpha=0.5)
    ax.set_xlabel(f"prediction (all {len(names)} classes)")
    ax.set_ylabel(f"true label (the {len(worst)} worst named)")
    fig.colorbar(image, ax=ax, shrink=0.7, label="% of the class's images")
    order = list(reversed(worst))  # the worst at the top
    bars.barh(range(len(order)), [per_class[i] for i in order], color="crimson", alpha=0.75)
    bars.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
    bars.set_xlim(0, 100)
    bars.set_xlabel("per-class accuracy (%)")
    bars.set_title(f"the {len(worst)} worst classes, and what they are taken for most", fontsize=10)
    for y, i in enumerate(order):
        wrong = [(n, j) for j, n in enumerate(conf[i]) if j != i and n]
        if wrong:
            n, j = max(wrong)
            bars.text(min(per_class[i] + 1.5, 60.0), y, f"→ {names[j]} ({n}/{record['support'][i]})",
                      va="center", fontsize=7)
    return fig
