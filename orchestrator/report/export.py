"""Writing a Table as Markdown (the paper's layout) and as tidy CSV / Parquet (one line per cell)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .classes import worst_markdown
from .environments import EnvironmentSummary, markdown_lines
from .tables import HEADERS, Table, format_cell


def header(column: str) -> str:
    if column.startswith("target/"):
        return column.split("/", 1)[1]
    return HEADERS.get(column, column)


def tidy(table: Table) -> pd.DataFrame:
    """One record per (section, row, column): ours with mean/std/n, paper reference rows, and deltas."""
    records = []
    for sec in table.sections:
        for label in table.rows:
            for col in sec.columns:
                cell = sec.cells[label][col]
                records.append({
                    "section": sec.title, "row": label, "kind": "ours", "column": col,
                    "mean": cell.mean, "std": cell.std, "n": cell.n, "expected": cell.expected,
                    "status": cell.status,
                    "seeds": ",".join(str(s) for s in sorted(cell.values)),
                    "missing_seeds": ",".join(str(s) for s in table.seeds if s not in cell.values),
                    "run_ids": ",".join(cell.run_ids),
                    "launches": ",".join(cell.launches),
                    "pending": ",".join(cell.pending),
                })
        for ref_row, cols in sec.reference.items():
            for col, value in cols.items():
                base = {"section": sec.title, "column": col, "std": None, "n": None, "expected": None,
                        "seeds": "", "missing_seeds": "", "run_ids": "", "launches": "", "pending": ""}
                records.append({**base, "row": f"{ref_row} (paper)", "kind": "paper", "mean": value,
                                "status": "reference"})
                delta = table.delta(sec, ref_row, col)
                if delta is not None:
                    records.append({**base, "row": f"{ref_row} − paper", "kind": "delta", "mean": delta,
                                    "status": "delta"})
    df = pd.DataFrame.from_records(records)
    return df.astype({"mean": "float64", "std": "float64", "n": "Int64", "expected": "Int64"})


def markdown(table: Table, environments: EnvironmentSummary | None = None) -> str:
    seeds = ", ".join(str(s) for s in table.seeds)
    note = environments.note() if environments is not None else None
    lines = [
        f"# {table.name}: {table.shape}",
        "",
        *([f"**{note}** (see Environments below)", ""] if note else []),
        f"Mean ± sample std (ddof=1) over seeds {seeds}; `(n=k/{len(table.seeds)})` marks cells with fewer "
        "finished seeds, `missing` cells with none (with the state of unfinished runs). Reference rows are the "
        "paper's numbers (docs/protocols.md); `− paper` rows are ours minus the paper's.",
        "",
        f"Source: {table.source()}",
        "",
    ]
    for sec in table.sections:
        lines += [f"## {sec.title}", ""]
        if sec.note:
            lines += [f"_{sec.note}_", ""]
        lines.append("| Method | " + " | ".join(header(c) for c in sec.columns) + " |")
        lines.append("|---|" + "---:|" * len(sec.columns))
        for label in table.rows:
            cells = [format_cell(sec.cells[label][c]) for c in sec.columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for ref_row, cols in sec.reference.items():
            lines.append(f"| {ref_row} (paper) | " + " | ".join(
                f"{cols[c]:.2f}" if c in cols else "" for c in sec.columns) + " |")
            deltas = [table.delta(sec, ref_row, c) for c in sec.columns]
            if any(d is not None for d in deltas):
                lines.append(f"| {ref_row} − paper | " + " | ".join(
                    f"{d:+.2f}" if d is not None else "" for d in deltas) + " |")
        lines.append("")
        lines += worst_markdown(table.worst_classes.get(sec.title))
    if environments is not None:
        lines += markdown_lines(environments)
    return "\n".join(lines)


def write_tables(table: Table, out: Path, environments: EnvironmentSummary | None = None) -> dict[str, Path]:
    """`<name>.md` (with the runs' environments), `<name>.csv`, `<name>.parquet` under out; the paths by format."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"table_{table.shape}"
    paths = {"md": stem.with_suffix(".md"), "csv": stem.with_suffix(".csv"), "parquet": stem.with_suffix(".parquet")}
    paths["md"].write_text(markdown(table, environments))
    df = tidy(table)
    df.to_csv(paths["csv"], index=False)
    df.to_parquet(paths["parquet"], engine="pyarrow", index=False)
    return paths
