"""The report's index.html: every table with cells linked to their MLflow runs, figures, study reports."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

from .classes import worst_html
from .environments import SHOWN, EnvironmentSummary
from .export import header
from .studies import StudyReport
from .tables import Cell, Table, format_cell


# MLflow 3's UI opens what its global "GenAI / Model training" switch says unless a link names the workflow.
WORKFLOW = "workflowType=machine_learning"


class RunLinks:
    """URLs into the MLflow UI for one experiment (`<ui>/#/experiments/<id>/runs/<run_id>`), in its model
    training view."""

    def __init__(self, ui_url: str, experiment_id: str):
        self.ui = ui_url.rstrip("/")
        self.experiment_id = experiment_id

    def run(self, run_id: str) -> str:
        return f"{self.ui}/#/experiments/{self.experiment_id}/runs/{run_id}?{WORKFLOW}"

    def cell(self, run_ids: tuple[str, ...]) -> str:
        run_ids = tuple(dict.fromkeys(run_ids))  # a derived cell (an average's HM) reads the same run twice
        if len(run_ids) == 1:
            return self.run(run_ids[0])
        runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
        experiments = quote(json.dumps([self.experiment_id], separators=(",", ":")))
        return f"{self.ui}/#/compare-runs?runs={runs}&experiments={experiments}&{WORKFLOW}"


def _cell_html(cell: Cell, links: RunLinks) -> str:
    text = html.escape(format_cell(cell))
    cls = {"complete": "ok", "partial": "partial", "missing": "missing"}[cell.status]
    if cell.run_ids:
        title = f"{len(cell.run_ids)} MLflow run(s) of launch {', '.join(cell.launches)}"
        text = f"<a href=\"{html.escape(links.cell(cell.run_ids))}\" title=\"{title}\">{text}</a>"
    return f"<td class=\"{cls}\">{text}</td>"


def table_html(table: Table, links: RunLinks) -> str:
    parts = []
    for sec in table.sections:
        parts.append(f"<h3>{html.escape(sec.title)}</h3>")
        if sec.note:
            parts.append(f"<p class=\"note\">{html.escape(sec.note)}</p>")
        head = "".join(f"<th>{html.escape(header(c))}</th>" for c in sec.columns)
        body = []
        for label in table.rows:
            cells = "".join(_cell_html(sec.cells[label][c], links) for c in sec.columns)
            body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
        for ref_row, cols in sec.reference.items():
            vals = "".join(f"<td class=\"ref\">{cols[c]:.2f}</td>" if c in cols else "<td></td>" for c in sec.columns)
            body.append(f"<tr><th>{html.escape(ref_row)} (paper)</th>{vals}</tr>")
            deltas = [table.delta(sec, ref_row, c) for c in sec.columns]
            if any(d is not None for d in deltas):
                vals = "".join(f"<td class=\"delta\">{d:+.2f}</td>" if d is not None else "<td></td>" for d in deltas)
                body.append(f"<tr><th>{html.escape(ref_row)} − paper</th>{vals}</tr>")
        parts.append(f"<table><tr><th>Method</th>{head}</tr>{''.join(body)}</table>")
        parts.append(worst_html(table.worst_classes.get(sec.title)))
    return "\n".join(parts)


def missing_summary(table: Table) -> tuple[int, int, list[str]]:
    """(finished cells, expected cells, missing/partial descriptions) over the per-dataset sections."""
    done = total = 0
    notes = []
    for sec in table.sections:
        if sec.title == "Average":
            continue
        for label in table.rows:
            cell = sec.cells[label][sec.columns[0]]
            total += cell.expected
            done += cell.n
            if cell.status != "complete":
                missing = [str(s) for s in table.seeds if s not in cell.values]
                pend = f" ({', '.join(cell.pending)})" if cell.pending else ""
                notes.append(f"{label} on {sec.title}: seed(s) {', '.join(missing)} missing{pend}")
    return done, total, notes


def environments_html(summary: EnvironmentSummary | None, links: RunLinks) -> str:
    """The index's Environments section: one column per environment, the differing keys marked."""
    if summary is None or (not summary.environments and not summary.unrecorded):
        return "<p>No finished run in the table yet.</p>"
    parts = []
    if summary.environments:
        head = "".join(f"<th>env {i + 1}</th>" for i in range(len(summary.environments)))
        rows = ["<tr><th>runs</th>" + "".join(
            f"<td><a href=\"{html.escape(links.cell(e.run_ids))}\">{len(e.run_ids)}</a></td>"
            for e in summary.environments) + "</tr>"]
        for key in SHOWN:
            cls = " class=\"differs\"" if key in summary.differing else ""
            rows.append(f"<tr{cls}><th>{html.escape(key)}</th>" + "".join(
                f"<td>{html.escape(e.value(key))}</td>" for e in summary.environments) + "</tr>")
        rows.append("<tr><th>hosts</th>" + "".join(f"<td>{html.escape(', '.join(e.hosts))}</td>"
                                                    for e in summary.environments) + "</tr>")
        if len(summary.environments) > 1:
            rows.append("<tr><th>cells</th>" + "".join(f"<td>{html.escape(', '.join(e.cells))}</td>"
                                                        for e in summary.environments) + "</tr>")
        parts.append(f"<table class=\"env\"><tr><th></th>{head}</tr>{''.join(rows)}</table>")
    if summary.unrecorded:
        parts.append(f"<p class=\"note\">Without an environment record: {len(summary.unrecorded)} run(s) "
                     f"(tracked before runs recorded their environment).</p>")
    return "\n".join(parts)


def write_index(out: Path, table: Table, links: RunLinks, table_files: dict[str, Path], figures: list[Path],
                studies: list[StudyReport], tracking_uri: str, storage: str,
                environments: EnvironmentSummary | None = None) -> Path:
    done, total, notes = missing_summary(table)
    env_note = environments.note() if environments is not None else None
    env_banner = f"<p class=\"mixed\">{html.escape(env_note)} (see <a href=\"#environments\">Environments</a>)</p>" \
        if env_note else ""
    files = " · ".join(f"<a href=\"{p.name}\">{k.upper()}</a>" for k, p in table_files.items())
    figs = "\n".join(f"<figure><img src=\"{p.relative_to(out).as_posix()}\" alt=\"{p.stem}\">"
                     f"<figcaption>{p.name}</figcaption></figure>" for p in figures)
    study_rows = "".join(
        f"<tr><td><a href=\"{s.html.relative_to(out).as_posix()}\">{html.escape(s.study)}</a></td>"
        f"<td>{'' if s.best_value is None else f'{s.best_value:.4f}'}</td>"
        f"<td>{html.escape(json.dumps(s.best_params))}</td><td>{s.n_complete}/{s.n_pruned}/{s.n_failed}</td>"
        f"<td><a href=\"{s.best_json.relative_to(out).as_posix()}\">JSON</a></td></tr>" for s in studies)
    studies_html = (f"<table><tr><th>study</th><th>best value</th><th>best params</th>"
                    f"<th>complete/pruned/failed</th><th>best</th></tr>{study_rows}</table>"
                    if studies else "<p>No Optuna study for this spec in the storage.</p>")
    missing_html = ("<p class=\"ok\">Every expected run has finished.</p>" if not notes else
                    "<ul class=\"missing\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>hisf-bench report: {html.escape(table.name)}</title>
<style>
body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th:first-child{{text-align:left}}
td.missing{{background:#fde2e2}} td.partial{{background:#fff4d6}} td.ref{{color:#555}} td.delta{{color:#225}}
.note{{color:#a60}} figure{{display:inline-block;margin:0 1em 1em 0}} img{{max-width:580px}}
.mixed{{background:#fde2e2;padding:6px 10px;border-left:4px solid #a00}} tr.differs th,tr.differs td{{background:#fff4d6}}
table.env td{{text-align:left}} details.worst td.cls{{text-align:left}} details.worst summary{{color:#444}}
code{{background:#f4f4f4;padding:1px 4px}}
</style></head>
<body>
<h1>hisf-bench report: {html.escape(table.name)} ({html.escape(table.shape)})</h1>
<p>{done} of {total} expected seeded runs finished. Cells show mean ± sample std (ddof=1) over seeds
{', '.join(str(s) for s in table.seeds)}; each links to its MLflow runs. Tables: {files}.</p>
{env_banner}
<p class="source">{html.escape(table.source())}</p>
<h2>Missing</h2>
{missing_html}
<h2>Tables</h2>
{table_html(table, links)}
<h2 id="environments">Environments</h2>
{environments_html(environments, links)}
<h2>Figures</h2>
{figs or '<p>No figure.</p>'}
<h2>Optuna studies</h2>
{studies_html}
<h2>Open the trackers</h2>
<p>MLflow UI: <code>mlflow ui --backend-store-uri {html.escape(tracking_uri)} --host 127.0.0.1</code>, then open
<a href="{html.escape(links.ui)}">{html.escape(links.ui)}</a> (group runs by <code>hisf.dataset</code>,
<code>hisf.row</code>, <code>hisf.stage</code>).
Optuna dashboard: <code>optuna-dashboard {html.escape(storage)}</code> (<code>pip install optuna-dashboard</code>).</p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(doc)
    return path
