"""The paper-shaped tables: per-cell mean ± std over seeds, dataset averages, reference rows and deltas."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from .plan import ReportPlan, Variant
from .reference import AVERAGE, reference_cells
from .runs import Launch, TrialRun

TARGET_AVERAGE = "target_average"
HEADERS = {"base_acc": "Base", "novel_acc": "Novel", "hm": "HM", "acc": "Source", TARGET_AVERAGE: "Average"}


@dataclass(frozen=True)
class Cell:
    """One table cell: a value per finished seed, summarised as mean and sample std (ddof=1)."""

    values: dict[int, float]  # seed -> value
    expected: int  # seeds the spec asks for
    mean: float | None
    run_ids: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()  # statuses of unfinished runs for the missing seeds (running, failed, ...)
    incomplete_parts: int = 0  # derived cells: parts not complete (a partial or missing dataset or target)
    launches: tuple[str, ...] = ()  # the MLflow parent runs (launches) its runs belong to

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def std(self) -> float | None:
        # Sample std over seeds (ddof=1), the convention of the community's "mean ± std over 3 seeds".
        return statistics.stdev(self.values.values()) if self.n >= 2 else None

    @property
    def status(self) -> str:
        if self.mean is None:
            return "missing"
        return "complete" if self.n >= self.expected and not self.incomplete_parts else "partial"


@dataclass
class Section:
    title: str  # a dataset key, "Average", or (transfer tables) the source dataset
    columns: tuple[str, ...]
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)  # row label -> column -> cell
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # paper row -> column -> value
    note: str = ""


@dataclass
class Table:
    name: str
    shape: str
    seeds: tuple[int, ...]
    experiment_id: str
    rows: tuple[str, ...]  # our row labels in spec order
    sections: list[Section]
    launch: Launch | None = None  # the one launch every cell's runs come from
    other_launches: tuple[Launch, ...] = ()  # table-stage launches not used (older, or of the other stage)
    spec_hash: str = ""  # the spec's hash now
    # Per-dataset section title -> each row's worst classes per split (orchestrator/report/classes.py).
    worst_classes: dict = field(default_factory=dict)

    def source(self) -> str:
        """Where the numbers come from: the launch (MLflow parent run), when it started, its spec hash."""
        if self.launch is None:
            return "No finished final or sweep launch yet."
        ln = self.launch
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ln.start_time / 1000)) if ln.start_time else "?"
        text = f"Every cell comes from one {ln.stage} launch: MLflow parent run {ln.run_id or '(none)'}, started {started}"
        if ln.spec_hash:
            text += f", spec hash {ln.spec_hash}"
            if self.spec_hash and ln.spec_hash != self.spec_hash:
                text += f" (the spec's hash is now {self.spec_hash}: these runs are of an earlier version of the spec)"
        text += "."
        if self.other_launches:
            text += f" {len(self.other_launches)} other final/sweep launch(es) not used: " + ", ".join(
                f"{o.stage} {o.run_id}" for o in self.other_launches) + "."
        return text

    def delta(self, section: Section, ref_row: str, column: str) -> float | None:
        """Ours − paper for the row of the same name, when both exist."""
        ours = section.cells.get(_match(ref_row, self.rows), {}).get(column)
        paper = section.reference.get(ref_row, {}).get(column)
        if ours is None or ours.mean is None or paper is None:
            return None
        return ours.mean - paper


def build_table(plan: ReportPlan, chosen: dict[tuple[Variant, str, int], TrialRun],
                pending: dict[tuple[Variant, str], list[TrialRun]], experiment_id: str,
                launch: Launch | None = None, other_launches: tuple[Launch, ...] = ()) -> Table:
    """Aggregate the chosen runs (all of `launch`) into the report shape the spec names."""
    labels = tuple(v.label for v in plan.variants)
    sections: list[Section] = []
    transfer = plan.protocol in ("cross_dataset", "domain_generalization")
    for dataset in plan.datasets:
        columns = plan.metrics + ((TARGET_AVERAGE,) if transfer and len(plan.targets) > 1 else ())
        sec = Section(dataset, columns)
        for v in plan.variants:
            runs = {seed: chosen[(v, dataset, seed)] for seed in plan.seeds if (v, dataset, seed) in chosen}
            unfinished = [r for r in pending.get((v, dataset), []) if r.seed in plan.seeds and r.seed not in runs]
            row = {m: _run_cell(runs, m, len(plan.seeds), unfinished) for m in plan.metrics}
            if TARGET_AVERAGE in columns:
                # Tables 2-3 average the targets (source excluded), per seed for the std.
                row[TARGET_AVERAGE] = _derived([row[f"target/{t}"] for t in plan.targets], _mean, len(plan.seeds))
            sec.cells[v.label] = row
        sections.append(sec)
    # Table 1 leads with the average over datasets (base-to-novel always has it: the paper's rows live there).
    if plan.protocol == "base2new" or (not transfer and len(plan.datasets) > 1):
        sections.insert(0, _average_section(plan, sections))
    # Published numbers only beside numbers made the same way (backbone, shots, datasets): anything else
    # would read as a difference of methods.
    unlike = plan.unlike_the_paper()
    references = {} if unlike else reference_cells(plan.shape, plan.datasets[0], plan.targets)
    for sec in sections:
        for ref_row, cells in references.items():
            in_section = {col: val for (title, col), val in cells.items() if title == sec.title}
            if in_section:
                sec.reference[ref_row] = in_section
    published = reference_cells(plan.shape, plan.datasets[0], plan.targets)
    if published and sections:
        if unlike:
            note = f"No paper rows beside this table: {unlike}, so its numbers are not comparable to the published ones."
        else:
            # Ours without a published number of the same name (CoOp: docs/protocols.md lists none) say so.
            lacking = [r for r in labels if not _match(r, tuple(published))] if plan.shape == "base2new" else []
            note = (f"No published number on file for {', '.join(lacking)} (docs/protocols.md lists none), so "
                    f"{'it has' if len(lacking) == 1 else 'they have'} no paper row.") if lacking else ""
        if note:
            sections[0].note = f"{sections[0].note} {note}".strip()
    return Table(plan.name, plan.shape, plan.seeds, experiment_id, labels, sections, launch, tuple(other_launches),
                 plan.spec_hash)


def _average_section(plan: ReportPlan, per_dataset: list[Section]) -> Section:
    columns = per_dataset[0].columns
    sec = Section(AVERAGE, columns)
    notes = []
    if "hm" in columns:
        notes.append("HM here is the HM of the average base and novel accuracies (Table 1's convention), "
                     "not the mean of the per-dataset HMs.")
    sec.note = " ".join(notes)
    for label in (v.label for v in plan.variants):
        row = {}
        for col in columns:
            if col == "hm" and "base_acc" in columns and "novel_acc" in columns:
                continue
            row[col] = _derived([s.cells[label][col] for s in per_dataset], _mean, len(plan.seeds))
        if "hm" in columns and "hm" not in row:
            # Table 1's average HM is the HM of the averaged base and novel accuracies
            # (the paper's own rows satisfy it: CLIP 69.34/74.22 -> 71.70).
            row["hm"] = _derived([row["base_acc"], row["novel_acc"]], lambda xs: _hm(*xs), len(plan.seeds))
        sec.cells[label] = {col: row[col] for col in columns}
    return sec


def _run_cell(runs: dict[int, TrialRun], metric: str, expected: int, unfinished: list[TrialRun]) -> Cell:
    values = {seed: r.metrics[metric] for seed, r in runs.items() if metric in r.metrics}
    ids = tuple(r.run_id for seed, r in sorted(runs.items()) if seed in values)
    launches = tuple(sorted({r.parent_run_id for seed, r in runs.items() if seed in values}))
    mean = statistics.fmean(values.values()) if values else None
    return Cell(values, expected, mean, ids, tuple(sorted(r.status for r in unfinished)), launches=launches)


def _derived(parts: list[Cell], combine: Callable[[list[float]], float], expected: int) -> Cell:
    """A cell computed from other cells: value per seed where every part has that seed."""
    missing = sum(1 for p in parts if p.mean is None)
    common = set.intersection(*(set(p.values) for p in parts)) if parts else set()
    values = {s: combine([p.values[s] for p in parts]) for s in sorted(common)}
    # The mean combines the parts' own means so that every finished run counts even when seeds differ.
    mean = None if missing or not parts else combine([p.mean for p in parts])
    ids = tuple(dict.fromkeys(i for p in parts for i in p.run_ids))  # HM's parts are the same runs
    pending = tuple(s for p in parts for s in p.pending)
    partial = sum(1 for p in parts if p.status != "complete")
    launches = tuple(sorted({ln for p in parts for ln in p.launches}))
    return Cell(values, expected, mean, ids, pending, incomplete_parts=partial, launches=launches)


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs)


def _hm(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _match(ref_row: str, rows: tuple[str, ...]) -> str:
    for r in rows:
        if r.casefold() == ref_row.casefold():
            return r
    return ""


def format_cell(cell: Cell | None, digits: int = 2) -> str:
    """`82.28 ± 0.41`, with `(n=2/3)` when seeds are missing and `missing (0/3, 1 running)` when empty."""
    if cell is None:
        return ""
    pending = ""
    if cell.pending:
        counts: dict[str, int] = {}
        for s in cell.pending:
            counts[s] = counts.get(s, 0) + 1
        pending = ", " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    if cell.mean is None:
        return f"missing ({cell.n}/{cell.expected}{pending})"
    text = f"{cell.mean:.{digits}f}"
    text += f" ± {cell.std:.{digits}f}" if cell.std is not None and not math.isnan(cell.std) else " ± –"
    if cell.status == "partial":
        text += f" (n={cell.n}/{cell.expected}{pending})"
    return text
