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
from orchestrator.results import CLASS_FIELDS

from .plan import ReportPlan, Variant
from .runs import TrialRun

WORST_SHOWN = 5
# Result keys that are a split of their own (hm and the target average are derived from others).
SPLIT_METRICS = ("base_acc", "novel_acc", "acc")
# Runs whose artifacts are final (hisf.status): a finished run is never reopened (resume reuses it), while a
# failed one may be continued by Tune's retry in the same MLflow run and write its records then.
ENDED = ("finished",)
# Records read at once: each is a request to the artifact store (mlflow server), mostly waiting.
DOWNLOAD_WORKERS = 16


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
                       n: int = WORST_SHOWN, cache: Path | None = None,
                       workers: int = DOWNLOAD_WORKERS) -> dict[str, list[CellClasses]]:
    """Per dataset (a per-dataset section's title), each row's n worst classes of each test split.

    A run whose launch record carries its per-class results (what its trial reported to the driver) needs no
    download. The others are read `workers` at a time (each is one request to a remote artifact store), and what
    a report needs of a finished run's record (class names, per-class accuracy) is kept under `cache`: a run's
    artifacts do not change once it has ended, so the next report of the same runs downloads nothing."""
    cells = []
    for dataset in plan.datasets:
        for v in plan.variants:
            runs = {s: chosen[(v, dataset, s)] for s in plan.seeds if (v, dataset, s) in chosen}
            if runs:
                cells += [(dataset, v, split_name(metric), runs) for metric in split_metrics(plan)]
    # What a launch's record carries (its trials reported it) is read from there; the rest from each run's files.
    carried = {(run.run_id, split): run.classes[split] for _, _, split, runs in cells for run in runs.values()
               if run.classes and split in run.classes}
    wanted = sorted({(run.run_id, split) for _, _, split, runs in cells for run in runs.values()} - set(carried))
    ended = {run.run_id for _, _, _, runs in cells for run in runs.values() if run.status in ENDED}
    records = {**carried, **_read_records(wanted, ended, tracking_uri, cache, workers)}
    out: dict[str, list[CellClasses]] = {}
    for dataset, v, split, runs in cells:
        read = {seed: records[(run.run_id, split)] for seed, run in sorted(runs.items())
                if records.get((run.run_id, split)) is not None}
        unread = tuple(seed for seed in sorted(runs) if seed not in read)
        out.setdefault(dataset, []).append(
            CellClasses(v.label, dataset, split, rank_classes(read, n), tuple(read), unread))
    return out


def _read_records(wanted: list[tuple[str, str]], ended: set[str], tracking_uri: str, cache: Path | None,
                  workers: int) -> dict[tuple[str, str], dict | None]:
    """(run id, split) -> the part of its eval/<split>.json a report reads, or None when the run has none."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    out, missing = {}, []
    for key in wanted:
        hit = _cached(cache, *key) if cache is not None and key[0] in ended else None
        if hit is not None:
            out[key] = hit
        else:
            missing.append(key)
    if not missing:
        return out
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="hisf-report-classes-") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = pool.map(lambda key: _download(client, key[0], key[1], Path(tmp) / key[0] / key[1]), missing)
        for key, record in zip(missing, found):
            out[key] = record
            if record is not None and cache is not None and key[0] in ended:
                _store(cache, *key, record)
    return out


def _download(client, run_id: str, split: str, dest: Path) -> dict | None:
    """What a report reads of the run's eval/<split>.json, or None when it has none (a run logged before
    per-class results existed)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, f"{EVAL_DIR}/{split}.json", str(dest))
        record = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no such artifact (MLflow raises its own, OSError or a 404): not recorded
        return None
    return {key: record[key] for key in CLASS_FIELDS}


def _cache_file(cache: Path, run_id: str, split: str) -> Path:
    return cache / run_id / f"{split.replace('/', '__')}.json"


def _cached(cache: Path, run_id: str, split: str) -> dict | None:
    try:
        record = json.loads(_cache_file(cache, run_id, split).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and all(k in record for k in CLASS_FIELDS) else None


def _store(cache: Path, run_id: str, split: str, record: dict) -> None:
    """Written whole or not at all (a report stopped half-way leaves no torn file to read back)."""
    path = _cache_file(cache, run_id, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


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
