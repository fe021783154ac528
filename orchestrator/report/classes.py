"""The worst classes of each per-dataset table cell: per-class test accuracies read from the cell's runs' `eval/<split>.json`
artifacts (hisf.class_results), ranked by their mean over the seeds, each seed's value beside it, so a seed that
fails on a few classes (CoOp's DTD at 12-15% on two seeds, 63% on the third) shows which classes."""

from __future__ import annotations

import html
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hisf.class_results import EVAL_DIR, split_name

from .plan import ReportPlan, Variant
from .runs import TrialRun

WORST_SHOWN = 5
# Result keys that are a split of their own (hm and the target average are derived from others).
SPLIT_METRICS = ("base_acc", "novel_acc", "acc")


@dataclass(frozen=True)
class WorstClass:
    name: str
    mean: float  # over the seeds whose split holds the class
    values: dict[int, float]  # seed -> per-class accuracy (percent)


@dataclass(frozen=True)
class CellClasses:
    """One (row, dataset, split): its worst classes over the seeds read, and the seeds whose run had no results."""

    row: str
    dataset: str
    split: str
    classes: tuple[WorstClass, ...]
    seeds: tuple[int, ...]
    unread: tuple[int, ...] = ()


def split_metrics(plan: ReportPlan) -> tuple[str, ...]:
    return tuple(m for m in plan.metrics if m in SPLIT_METRICS or m.startswith("target/"))


def read_worst_classes(plan: ReportPlan, chosen: dict[tuple[Variant, str, int], TrialRun], tracking_uri: str,
                       n: int = WORST_SHOWN) -> dict[str, list[CellClasses]]:
    """Per dataset (a per-dataset section's title), each row's n worst classes of each test split."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out: dict[str, list[CellClasses]] = {}
    with tempfile.TemporaryDirectory(prefix="hisf-report-classes-") as tmp:
        for dataset in plan.datasets:
            for v in plan.variants:
                runs = {s: chosen[(v, dataset, s)] for s in plan.seeds if (v, dataset, s) in chosen}
                if not runs:
                    continue
                for metric in split_metrics(plan):
                    split = split_name(metric)
                    records, unread = {}, []
                    for seed, run in sorted(runs.items()):
                        record = _download(client, run.run_id, split, Path(tmp) / run.run_id)
                        if record is None:
                            unread.append(seed)
                        else:
                            records[seed] = record
                    out.setdefault(dataset, []).append(
                        CellClasses(v.label, dataset, split, rank_classes(records, n), tuple(records), tuple(unread)))
    return out


def _download(client, run_id: str, split: str, dest: Path) -> dict | None:
    """The run's eval/<split>.json, or None when it has none (a run logged before per-class results existed)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, f"{EVAL_DIR}/{split}.json", str(dest))
        return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no such artifact (MLflow raises its own, OSError or a 404): not recorded
        return None


def rank_classes(records: dict[int, dict], n: int = WORST_SHOWN) -> tuple[WorstClass, ...]:
    """The n classes with the lowest mean per-class accuracy over the seeds' records (ties: by name)."""
    values: dict[str, dict[int, float]] = {}
    for seed, record in records.items():
        for name, acc in zip(record["classnames"], record["per_class_accuracy"]):
            if acc is not None:
                values.setdefault(name, {})[seed] = float(acc)
    ranked = sorted(values.items(), key=lambda kv: (statistics.fmean(kv[1].values()), kv[0]))
    return tuple(WorstClass(name, statistics.fmean(v.values()), dict(sorted(v.items()))) for name, v in ranked[:n])


def _seeds_text(c: WorstClass) -> str:
    return " · ".join(f"s{s} {v:.1f}" for s, v in c.values.items())


def _unread_note(cells: list[CellClasses]) -> str:
    unread = sorted({(c.row, s) for c in cells for s in c.unread})
    if not unread:
        return ""
    return (f"No per-class results for {len(unread)} run(s) ("
            + ", ".join(f"{row} seed {s}" for row, s in unread) + "): logged before runs recorded them.")


def worst_markdown(cells: list[CellClasses] | None) -> list[str]:
    """The per-dataset section's worst-classes table (Markdown lines; none without cells)."""
    if not cells:
        return []
    lines = [f"Worst classes (the {WORST_SHOWN} lowest per-class test accuracies of each row and split, mean over "
             "the seeds, then each seed's value):", "",
             "| Method | Split | Class | Mean | Per seed |", "|---|---|---|---:|---|"]
    for cell in cells:
        for c in cell.classes:
            lines.append(f"| {cell.row} | {cell.split} | {c.name} | {c.mean:.2f} | {_seeds_text(c)} |")
    note = _unread_note(cells)
    return lines + ([""] + [f"_{note}_"] if note else []) + [""]


def worst_html(cells: list[CellClasses] | None) -> str:
    if not cells:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(cell.row)}</th><td>{html.escape(cell.split)}</td><td class=\"cls\">"
        f"{html.escape(c.name)}</td><td>{c.mean:.2f}</td><td class=\"cls\">{html.escape(_seeds_text(c))}</td></tr>"
        for cell in cells for c in cell.classes)
    note = _unread_note(cells)
    return (f"<details class=\"worst\" open><summary>Worst classes: the {WORST_SHOWN} lowest per-class test accuracies "
            "of each row and split, mean over the seeds, then each seed's value</summary>"
            f"<table><tr><th>Method</th><th>split</th><th>class</th><th>mean</th><th>per seed</th></tr>{rows}</table>"
            + (f"<p class=\"note\">{html.escape(note)}</p>" if note else "") + "</details>")


def write_worst_csv(worst: dict[str, list[CellClasses]], path: Path) -> Path | None:
    """`worst_classes.csv`: one line per (dataset, row, split, class, seed) of the listed classes."""
    import pandas as pd

    records = [{"dataset": cell.dataset, "row": cell.row, "split": cell.split, "rank": rank, "class": c.name,
                "mean": c.mean, "seed": seed, "accuracy": value}
               for cells in worst.values() for cell in cells
               for rank, c in enumerate(cell.classes, start=1) for seed, value in c.values.items()]
    if not records:
        return None
    pd.DataFrame.from_records(records).to_csv(path, index=False)
    return path
