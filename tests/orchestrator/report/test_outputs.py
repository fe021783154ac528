"""Report files from real MLflow runs and a real Optuna study: figures, study HTML, index links, Chromium render."""

from __future__ import annotations

import html
import json
import re
from urllib.parse import unquote

import numpy as np
import pytest

from orchestrator.report import build_report, plan_from_dict
from tests.orchestrator.report.helpers import (
    chromium,
    console_errors,
    png_colours,
    spec_dict,
    write_store,
    write_study,
)

DEPTHS = (1, 3, 5)


@pytest.fixture(scope="module")
def depth_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("depth")
    spec = spec_dict(name="depth", grid={"method.depth": list(DEPTHS)}, report="ablation_depth")
    variants = [(("method.depth", str(d)),) for d in DEPTHS]
    uri, exp, runs = write_store(tmp, spec, skip={("HISF", "oxford_pets", 3)}, variants=variants)
    write_study(tmp, "depth:HISF:caltech101:0ldrun", n_trials=2)  # a previous search: not the latest stage's
    storage, study = write_study(tmp, "depth:HISF:caltech101", with_mlflow=(uri, exp))
    write_study(tmp, "other-spec:HISF:caltech101", n_trials=2)  # another spec's study: not reported
    report = build_report(plan_from_dict(spec), tmp / "report", uri, storage, ui_url="http://127.0.0.1:5999")
    return report, runs, study, uri, exp


def test_figures_are_non_trivial_pngs(depth_report):
    report, *_ = depth_report
    names = sorted(p.name for p in report.figures)
    assert names == ["bars_base_acc.png", "bars_hm.png", "bars_novel_acc.png", "depth_curve.png"]
    for p in report.figures:
        assert p.stat().st_size > 10_000
        assert png_colours(p) > 50  # lines, bars, text: not a blank canvas


def test_depth_rows_follow_the_grid(depth_report):
    report, runs, *_ = depth_report
    avg = report.table.sections[0]
    assert avg.title == "Average"
    assert list(report.table.rows) == [f"{r} depth={d}" for r in ("CLIP", "MaPLe", "HISF") for d in DEPTHS]
    # depth=3 of HISF on caltech101 averages exactly the runs logged with method.depth=3
    cell = report.table.sections[1].cells["HISF depth=3"]["hm"]
    vals = [m["hm"] for (r, v, d, s), (_, m, st) in runs.items()
            if r == "HISF" and v == (("method.depth", "3"),) and d == "caltech101"]
    assert cell.n == 3 and cell.mean == pytest.approx(np.mean(vals)) and cell.std == pytest.approx(np.std(vals, ddof=1))
    assert avg.cells["HISF depth=3"]["hm"].status == "partial"


def test_study_report_is_self_contained_with_best_params(depth_report):
    report, runs, study, uri, exp = depth_report
    assert [s.study for s in report.studies] == ["depth:HISF:caltech101"]
    s = report.studies[0]
    text = s.html.read_text()
    assert s.html.stat().st_size > 3_000_000  # plotly.js embedded: opens offline
    assert not re.search(r"<script[^>]+src=\"https?:", text)
    for title in ("Optimisation history", "Validation curves (pruning)", "Parameter importances",
                  "Contour method.lambda_le × method.lambda_sa", "Slice"):
        assert f"<h2>{title}</h2>" in text
    assert "Not available yet" not in text
    best = json.loads(s.best_json.read_text())
    assert best["best_params"] == study.best_params
    assert best["best_value"] == pytest.approx(study.best_value)
    assert best["best_trial_number"] == study.best_trial.number
    assert best["trials"] == {"complete": 8, "pruned": 0, "failed": 0, "total": 8}
    from mlflow.tracking import MlflowClient

    linked = MlflowClient(uri).get_run(best["best_trial_mlflow_run_id"])
    assert linked.data.tags["optuna.trial_number"] == str(study.best_trial.number)


def test_study_with_one_trial_says_what_is_missing(tmp_path):
    spec = spec_dict(name="one")
    uri, exp, _ = write_store(tmp_path, spec)
    storage, _ = write_study(tmp_path, "one:HISF:caltech101", n_trials=1)
    report = build_report(plan_from_dict(spec), tmp_path / "r", uri, storage)
    text = report.studies[0].html.read_text()
    assert ("<h2>Parameter importances</h2><p class='note'>Not available yet: needs at least 2 finished "
            "trials, the study has 1.</p>") in text
    assert re.search(r"<h2>Slice</h2>\s*<div", text)  # one trial is enough for the history and slice plots
    assert report.studies[0].n_complete == 1 and len(re.findall(r"<tr><td>\d+</td>", text)) == 1


def test_index_cells_link_to_their_mlflow_runs(depth_report):
    report, runs, study, uri, exp = depth_report
    index = report.index.read_text()
    hrefs = re.findall(r'href="([^"]+)"', index)
    compare = [unquote(html.unescape(h)) for h in hrefs if "#/compare-runs?" in h]
    # the HISF depth=1 oxford_pets HM cell: the two finished seeds' runs
    want = [runs[("HISF", (("method.depth", "1"),), "oxford_pets", s)][0] for s in (1, 2)]
    compact = json.dumps(want, separators=(",", ":"))
    expected = f'http://127.0.0.1:5999/#/compare-runs?runs={compact}&experiments=["{exp}"]&workflowType=machine_learning'
    assert expected in compare
    single = f"http://127.0.0.1:5999/#/experiments/{exp}/runs/"
    assert "mlflow ui --backend-store-uri" in index and "--host 127.0.0.1</code>" in index
    study_hrefs = re.findall(r"href='([^']+)'", report.studies[0].html.read_text())
    singles = [h for h in study_hrefs if h.startswith(single)]
    assert len(singles) == 8  # each study trial links to its search run, in the model training view
    assert all(h.endswith("?workflowType=machine_learning") for h in singles)
    for name in ("table_ablation_depth.md", "table_ablation_depth.csv", "table_ablation_depth.parquet",
                 "figures/depth_curve.png", "studies/study_depth_HISF_caltech101.html"):
        assert f'"{name}"' in index and (report.out / name).is_file()
    assert "51 of 54 expected seeded runs finished" in index


def test_report_renders_in_headless_chromium(depth_report, tmp_path):
    report, *_ = depth_report
    shot = tmp_path / "index.png"
    proc = chromium(["--window-size=1280,2400", f"--screenshot={shot}", report.index.resolve().as_uri()],
                     tmp_path / "profile1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not console_errors(proc.stderr)
    assert shot.stat().st_size > 50_000 and png_colours(shot) > 200
    # The study page draws its figures with plotly.js: the DOM after scripts ran holds the SVG plots.
    study_html = report.studies[0].html.resolve().as_uri()
    proc = chromium(["--virtual-time-budget=10000", "--dump-dom", study_html], tmp_path / "profile2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not console_errors(proc.stderr)
    assert proc.stdout.count('class="main-svg"') >= 10  # 5 figures, 2+ svg layers each
    shot = tmp_path / "study.png"
    proc = chromium(["--window-size=1280,2400", f"--screenshot={shot}", study_html], tmp_path / "profile3")
    assert proc.returncode == 0 and not console_errors(proc.stderr)
    assert png_colours(shot) > 200


def test_console_error_detection_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script>x</body></html>")
    proc = chromium(["--dump-dom", page.as_uri()], tmp_path / "profile")
    assert len(console_errors(proc.stderr)) == 1
