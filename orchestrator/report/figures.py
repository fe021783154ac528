"""The report's PNG figures (matplotlib, Agg): per-dataset bar charts and Figure 2's depth curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters or CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .export import header  # noqa: E402
from .plan import ReportPlan  # noqa: E402
from .reference import AVERAGE  # noqa: E402
from .tables import Table  # noqa: E402


def bar_charts(table: Table, out: Path) -> list[Path]:
    """Base-to-novel shapes: one chart per metric, datasets on x. Transfer: one chart, targets on x."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    transfer = table.shape in ("cross_dataset", "domain_generalization")
    if transfer:
        for sec in table.sections:
            groups = [(header(c), {label: sec.cells[label][c] for label in table.rows}) for c in sec.columns]
            path = out / f"bars_{sec.title}.png"
            _grouped_bars(groups, table.rows, f"{table.name}: trained on {sec.title}", "accuracy (%)", path)
            paths.append(path)
        return paths
    for col in table.sections[0].columns:
        groups = [(sec.title, {label: sec.cells[label][col] for label in table.rows}) for sec in table.sections]
        path = out / f"bars_{col}.png"
        _grouped_bars(groups, table.rows, f"{table.name}: {header(col)} per dataset", f"{header(col)} (%)", path)
        paths.append(path)
    return paths


def _grouped_bars(groups, rows, title, ylabel, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(rows)) ** 0.5 + 2), 4.2), dpi=110)
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(groups))
    for i, label in enumerate(rows):
        means = [g[1][label].mean for g in groups]
        stds = [g[1][label].std or 0.0 for g in groups]
        heights = [m if m is not None else 0.0 for m in means]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, heights, width, yerr=stds, capsize=2, label=label)
        for p, m in zip(pos, means):
            if m is None:  # a cell with no finished run: mark it instead of drawing a zero bar
                ax.text(p, 1.0, "missing", rotation=90, ha="center", va="bottom", fontsize=7, color="#a00")
    ax.set_xticks(x, [g[0] for g in groups], rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 100)
    # Below the axes: a legend inside would hide the bars it names.
    ax.legend(fontsize=8, ncol=min(5, len(rows)), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def depth_curve(plan: ReportPlan, table: Table, out: Path) -> Path | None:
    """Figure 2: average base / novel / HM over datasets against the prompt insertion depth."""
    keys = [k for k in plan.grid_keys if k.endswith(".depth")]
    if not keys:
        return None
    key = keys[0]
    avg = next(s for s in table.sections if s.title == AVERAGE) if any(
        s.title == AVERAGE for s in table.sections) else table.sections[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for row in plan.rows:
        variants = [v for v in plan.variants if v.row == row]
        depths = [int(dict(v.values)[key]) for v in variants]
        for col, style in (("hm", "-o"), ("base_acc", "--s"), ("novel_acc", ":^"), ("acc", "-o")):
            if col not in avg.columns:
                continue
            pts = [(d, avg.cells[v.label][col]) for d, v in zip(depths, variants)]
            done = [(d, c) for d, c in pts if c.mean is not None]
            if not done:
                continue
            ax.errorbar([d for d, _ in done], [c.mean for _, c in done], yerr=[c.std or 0.0 for _, c in done],
                        fmt=style, capsize=3, label=f"{row} {header(col)}" if len(plan.rows) > 1 else header(col))
            for d, c in pts:
                if c.mean is None:
                    ax.axvline(d, color="#a00", alpha=0.15)
    all_depths = sorted({int(dict(v.values)[key]) for v in plan.variants})
    ax.set_xticks(all_depths)
    ax.set_xlabel("prompt insertion depth (layers 0 … depth−1)")
    ax.set_ylabel(f"accuracy (%), average over {len(plan.datasets)} dataset(s)")
    ax.set_title(f"{plan.name}: accuracy vs insertion depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "depth_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path
