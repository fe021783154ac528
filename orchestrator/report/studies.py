"""Optuna study reports: one self-contained HTML (history, importances, λ1×λ2 contour, slice) and best params."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import optuna
from optuna.trial import TrialState

from orchestrator.optuna_storage import open_storage

from .plan import ReportPlan
from .runs import TrackedRuns


@dataclass(frozen=True)
class StudyReport:
    study: str
    html: Path
    best_json: Path
    best_value: float | None
    best_params: dict
    n_complete: int
    n_pruned: int
    n_failed: int


def study_names(plan: ReportPlan, storage, tracked: TrackedRuns) -> list[str]:
    """The spec's current studies: those the latest search stage names, else every study named after the spec.

    Study names are `<spec>:<row>:<dataset>[:<grid point>]:<tag>` (orchestrator.trials.search_groups);
    the tag keeps a rerun's studies apart, so the latest search stage's list is the one to report.
    """
    if isinstance(storage, str):
        if _no_sqlite_file(storage):
            return []  # no study was ever created there; connecting would create an empty database
        storage = open_storage(storage)
    names = optuna.study.get_all_study_names(storage=storage)
    if tracked.studies is not None:
        return [n for n in tracked.studies if n in names]
    return sorted(n for n in names if n == plan.name or n.startswith(plan.name + ":"))


def _no_sqlite_file(storage: str) -> bool:
    return urlparse(storage).scheme == "sqlite" and storage.startswith("sqlite:///") \
        and not Path(storage[len("sqlite:///"):]).is_file()


def write_study_reports(plan: ReportPlan, storage: str, out: Path, tracked: TrackedRuns,
                        run_url) -> list[StudyReport]:
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    reports = []
    if isinstance(storage, str) and not _no_sqlite_file(storage):
        # One storage (one connection pool) for all studies, opened as the run commands open it.
        storage = open_storage(storage)
    for name in study_names(plan, storage, tracked):
        study = optuna.load_study(study_name=name, storage=storage)
        reports.append(_one_study(study, plan, out, tracked, run_url))
    return reports


def _file_stem(name: str) -> str:
    return "study_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _trial_runs(study_name: str, tracked: TrackedRuns) -> dict[int, str]:
    # Search-stage runs carry optuna.study / optuna.trial_number (tracking layout): trial -> MLflow run.
    out = {}
    for run in tracked.runs:
        if run.tags.get("optuna.study") == study_name and run.tags.get("optuna.trial_number", "").isdigit():
            out.setdefault(int(run.tags["optuna.trial_number"]), run.run_id)
    return out


def _lambda_pair(params: list[str]) -> list[str]:
    le = [p for p in params if p.endswith("lambda_le")]
    sa = [p for p in params if p.endswith("lambda_sa")]
    if le and sa:
        return [le[0], sa[0]]
    return params[:2]


def _one_study(study: optuna.Study, plan: ReportPlan, out: Path, tracked: TrackedRuns, run_url) -> StudyReport:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
    n_failed = sum(t.state == TrialState.FAIL for t in trials)
    best = max(complete, key=lambda t: t.value) if complete and study.direction.name == "MAXIMIZE" else (
        min(complete, key=lambda t: t.value) if complete else None)
    params = sorted({p for t in complete for p in t.params})
    runs = _trial_runs(study.study_name, tracked)
    stem = _file_stem(study.study_name)
    best_json = out / f"{stem}_best.json"
    best_json.write_text(json.dumps({
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_trial_number": best.number if best else None,
        "best_trial_mlflow_run_id": runs.get(best.number) if best else None,
        "trials": {"complete": len(complete), "pruned": n_pruned, "failed": n_failed, "total": len(trials)},
    }, indent=2))

    import optuna.visualization as vis

    # (title, figure, why it cannot be drawn yet or None): Optuna draws flat or empty plots from too few
    # trials (importances come out "equal"), so the report says what is missing instead.
    few = f"needs at least 2 finished trials, the study has {len(complete)}" if len(complete) < 2 else None
    figures = [("Optimisation history", lambda: vis.plot_optimization_history(study),
                None if trials else "the study has no trial yet")]
    if any(t.intermediate_values for t in trials):
        figures.append(("Validation curves (pruning)", lambda: vis.plot_intermediate_values(study), None))
    figures.append(("Parameter importances", lambda: vis.plot_param_importances(study), few))
    if len(params) >= 2:
        pair = _lambda_pair(params)
        spread = all(len({t.params.get(p) for t in complete if p in t.params}) >= 2 for p in pair)
        figures.append((f"Contour {pair[0]} × {pair[1]}", lambda: vis.plot_contour(study, params=pair),
                        few or (None if spread else "needs two distinct values of each parameter")))
    figures.append(("Slice", lambda: vis.plot_slice(study), None if complete else "needs a finished trial"))

    parts, plotly_included = [], False
    for title, make, missing in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if missing:
            parts.append(f"<p class='note'>Not available yet: {html.escape(missing)}.</p>")
            continue
        fig = make()
        fig.update_layout(height=420)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not plotly_included))
        plotly_included = True

    rows = []
    for t in trials:
        link = runs.get(t.number)
        cell = f"<a href='{html.escape(run_url(link))}'>{link[:8]}</a>" if link else ""
        rows.append(
            f"<tr><td>{t.number}</td><td>{t.state.name.lower()}</td>"
            f"<td>{'' if t.value is None else f'{t.value:.4f}'}</td>"
            f"<td>{html.escape(json.dumps(t.params))}</td><td>{cell}</td></tr>"
        )
    best_line = (f"best {plan.search_metric} = {best.value:.4f} at trial {best.number}: "
                 f"{html.escape(json.dumps(best.params))}" if best else "no finished trial yet")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Optuna study {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} .note{{color:#a60}}</style></head>
<body><h1>Optuna study {html.escape(study.study_name)}</h1>
<p>{len(trials)} trials: {len(complete)} complete, {n_pruned} pruned, {n_failed} failed. {best_line}.
Best parameters: <a href="{best_json.name}">{best_json.name}</a>.</p>
{''.join(parts)}
<h2>Trials</h2><table><tr><th>#</th><th>state</th><th>value</th><th>params</th><th>MLflow run</th></tr>
{''.join(rows)}</table></body></html>
"""
    path = out / f"{stem}.html"
    path.write_text(doc)
    return StudyReport(study.study_name, path, best_json, best.value if best else None,
                       dict(best.params) if best else {}, len(complete), n_pruned, n_failed)

