"""Report tables from a real MLflow store with known metrics: mean/std over seeds, missing, reference rows."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest

from orchestrator.report import build_report, plan_from_dict
from orchestrator.report.plan import PAPER_DATASETS
from orchestrator.report.reference import BASE2NEW_AVERAGE, CROSS_DATASET_HISF_SOURCE, CROSS_DATASET_HISF_TARGETS
from orchestrator.report.tables import format_cell
from tests.orchestrator.report.helpers import spec_dict, write_store


def _values(runs, row, dataset, metric, variant=()):
    return {seed: m[metric] for (r, v, d, seed), (_, m, status) in runs.items()
            if r == row and d == dataset and tuple(v) == tuple(variant) and status == "finished"}


def test_base2new_table_is_mean_and_sample_std_of_the_runs(tmp_path):
    spec = spec_dict()
    skip = {("MaPLe", "oxford_pets", 3)}
    uri, exp, runs = write_store(tmp_path, spec, skip=skip, running={("HISF", "caltech101", 2)},
                                 failed={("CLIP", "oxford_pets", 1)})
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_parquet(report.tables["parquet"])
    assert set(df.section) == {"Average", "caltech101", "oxford_pets"}
    ours = df[df.kind == "ours"].set_index(["section", "row", "column"])
    checked = 0
    for row in ("CLIP", "MaPLe", "HISF"):
        for dataset in ("caltech101", "oxford_pets"):
            for metric in ("base_acc", "novel_acc", "hm"):
                vals = _values(runs, row, dataset, metric)
                rec = ours.loc[(dataset, row, metric)]
                assert rec["n"] == len(vals)
                assert rec["mean"] == pytest.approx(np.mean(list(vals.values())), abs=1e-9)
                # sample std, ddof=1, as the community's tables
                assert rec["std"] == pytest.approx(np.std(list(vals.values()), ddof=1), abs=1e-9)
                assert rec["run_ids"].split(",") == [runs[(row, (), dataset, s)][0] for s in sorted(vals)]
                checked += 1
    assert checked == 18
    # The missing (skipped, running, failed) seeds are marked, with what became of the unfinished runs.
    assert ours.loc[("oxford_pets", "MaPLe", "hm")]["status"] == "partial"
    assert ours.loc[("oxford_pets", "MaPLe", "hm")]["missing_seeds"] == "3"
    assert ours.loc[("caltech101", "HISF", "base_acc")]["missing_seeds"] == "2"
    assert ours.loc[("caltech101", "HISF", "base_acc")]["pending"] == "running"
    assert ours.loc[("oxford_pets", "CLIP", "hm")]["pending"] == "failed"
    assert ours.loc[("caltech101", "CLIP", "hm")]["status"] == "complete"
    md = report.tables["md"].read_text()
    assert "(n=2/3, running 1)" in md and "(n=2/3, failed 1)" in md and "(n=2/3)" in md


def test_average_row_follows_table1_and_reference_deltas(tmp_path):
    spec = spec_dict(datasets=PAPER_DATASETS)  # the paper's rows average Table 1's 11 datasets
    uri, exp, runs = write_store(tmp_path, spec, seed_rng=3)
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_csv(report.tables["csv"])
    avg = df[(df.section == "Average")].set_index(["row", "column"])
    for row in ("CLIP", "MaPLe", "HISF"):
        per_seed = {}
        for metric in ("base_acc", "novel_acc"):
            per_ds = [_values(runs, row, d, metric) for d in PAPER_DATASETS]
            per_seed[metric] = {s: statistics.fmean(v[s] for v in per_ds) for s in (1, 2, 3)}
            assert avg.loc[(row, metric)]["mean"] == pytest.approx(statistics.fmean(per_seed[metric].values()))
            assert avg.loc[(row, metric)]["std"] == pytest.approx(statistics.stdev(per_seed[metric].values()))
        b, n = avg.loc[(row, "base_acc")]["mean"], avg.loc[(row, "novel_acc")]["mean"]
        # Table 1's average HM is the HM of the averaged base and novel accuracies.
        assert avg.loc[(row, "hm")]["mean"] == pytest.approx(2 * b * n / (b + n))
        hm_seeds = [2 * per_seed["base_acc"][s] * per_seed["novel_acc"][s]
                    / (per_seed["base_acc"][s] + per_seed["novel_acc"][s]) for s in (1, 2, 3)]
        assert avg.loc[(row, "hm")]["std"] == pytest.approx(statistics.stdev(hm_seeds))
    # Reference rows are the paper's numbers; deltas are ours minus the paper's, for rows we have.
    for row, (b, n, h) in BASE2NEW_AVERAGE.items():
        assert avg.loc[(f"{row} (paper)", "hm")]["mean"] == h
        assert avg.loc[(f"{row} (paper)", "base_acc")]["mean"] == b
    for row in ("CLIP", "MaPLe", "HISF"):
        for i, metric in enumerate(("base_acc", "novel_acc", "hm")):
            assert avg.loc[(f"{row} − paper", metric)]["mean"] == pytest.approx(
                avg.loc[(row, metric)]["mean"] - BASE2NEW_AVERAGE[row][i])
    assert ("PromptSRC − paper", "hm") not in avg.index  # no PromptSRC row of ours
    md = report.tables["md"].read_text()
    assert "| HISF (paper) | 85.39 | 76.12 | 80.75 |" in md
    d = avg.loc[("HISF − paper", "hm")]["mean"]
    assert f"{d:+.2f}" in md
    # The average's HM combines the same runs as its base and novel cells: each run is linked once.
    import html as html_lib
    import json
    import re
    from urllib.parse import unquote

    compare = [unquote(html_lib.unescape(h)) for h in re.findall(r'href="([^"]+)"', report.index.read_text())
               if "#/compare-runs?" in h]
    assert compare
    for link in compare:
        ids = json.loads(link.split("runs=", 1)[1].split("&", 1)[0])
        assert len(ids) == len(set(ids)), link
        assert link.endswith("&workflowType=machine_learning")
    hm_ids = avg.loc[("HISF", "hm")]["run_ids"].split(",")
    assert len(hm_ids) == len(set(hm_ids)) == len(PAPER_DATASETS) * 3


@pytest.mark.parametrize("change, why", [
    ({"datasets": ("caltech101", "shapes")}, "its average is over 2 dataset(s) (shapes not among them), the paper's "
                                             "over the 11 of Table 1"),
    ({"shots": 4}, "it trains with 4 shots, the paper with 16"),
    ({"backbone": {"name": "ViT-B-16", "pretrained": None}}, "its backbone is ViT-B-16 (random weights), the "
                                                             "paper's ViT-B-16 with its pretrained weights"),
])
def test_numbers_unlike_the_papers_get_no_paper_rows_and_say_why(tmp_path, change, why):
    spec = spec_dict(datasets=change.get("datasets", PAPER_DATASETS))
    spec["data"]["shots"] = change.get("shots", 16)
    if "backbone" in change:
        spec["base"] = {"backbone": change["backbone"]}
    uri, exp, runs = write_store(tmp_path, spec)
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_csv(report.tables["csv"])
    assert set(df.kind) == {"ours"}  # no paper rows, no deltas
    md = report.tables["md"].read_text()
    assert "(paper)" not in md and "− paper |" not in md
    assert f"No paper rows beside this table: {why}, so its numbers are not comparable to the published ones." in md
    assert why in report.index.read_text().replace("&#x27;", "'")


def test_a_row_without_published_numbers_says_so(tmp_path):
    spec = spec_dict(datasets=PAPER_DATASETS, rows=[{"name": "CoOp", "method": {"name": "coop"}},
                                                    {"name": "HISF", "method": {"name": "hisf"}}])
    uri, exp, runs = write_store(tmp_path, spec)
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    md = report.tables["md"].read_text()
    assert "No published number on file for CoOp (docs/protocols.md lists none), so it has no paper row." in md
    assert "| HISF − paper |" in md and "| CoOp − paper |" not in md


def test_missing_dataset_makes_the_average_missing(tmp_path):
    spec = spec_dict()
    skip = {("HISF", "oxford_pets", s) for s in (1, 2, 3)}
    uri, exp, runs = write_store(tmp_path, spec, skip=skip)
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_parquet(report.tables["parquet"]).set_index(["section", "row", "kind", "column"])
    assert df.loc[("oxford_pets", "HISF", "ours", "hm")]["status"] == "missing"
    assert pd.isna(df.loc[("oxford_pets", "HISF", "ours", "hm")]["mean"])
    assert df.loc[("Average", "HISF", "ours", "hm")]["status"] == "missing"
    assert ("Average", "HISF − paper", "delta", "hm") not in df.index
    assert df.loc[("Average", "MaPLe", "ours", "hm")]["status"] == "complete"
    md = report.tables["md"].read_text()
    assert "| HISF | missing (0/3) | missing (0/3) | missing (0/3) |" in md
    html = report.index.read_text()
    assert "HISF on oxford_pets: seed(s) 1, 2, 3 missing" in html
    # 3 rows x 2 datasets x 3 seeds expected, 3 missing
    assert "15 of 18 expected seeded runs finished" in html


def test_cross_dataset_table_targets_and_reference(tmp_path):
    targets = tuple(CROSS_DATASET_HISF_TARGETS)
    spec = spec_dict(name="xd", datasets=("imagenet",), protocol="cross_dataset", report="cross_dataset",
                     targets=targets, rows=[{"name": "MaPLe", "method": {"name": "maple"}},
                                            {"name": "HISF", "method": {"name": "hisf"}}])
    uri, exp, runs = write_store(tmp_path, spec, skip={("MaPLe", "imagenet", 2)})
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_parquet(report.tables["parquet"]).set_index(["section", "row", "column"])
    assert set(df.index.get_level_values(0)) == {"imagenet"}
    for row in ("MaPLe", "HISF"):
        for t in targets:
            vals = _values(runs, row, "imagenet", f"target/{t}")
            assert df.loc[("imagenet", row, f"target/{t}")]["mean"] == pytest.approx(np.mean(list(vals.values())))
        per_seed = [np.mean([_values(runs, row, "imagenet", f"target/{t}")[s] for t in targets])
                    for s in sorted(_values(runs, row, "imagenet", "acc"))]
        assert df.loc[("imagenet", row, "target_average")]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert df.loc[("imagenet", "HISF (paper)", "acc")]["mean"] == CROSS_DATASET_HISF_SOURCE
    assert df.loc[("imagenet", "HISF (paper)", "target_average")]["mean"] == pytest.approx(66.793)
    assert df.loc[("imagenet", "HISF − paper", "target/dtd")]["mean"] == pytest.approx(
        df.loc[("imagenet", "HISF", "target/dtd")]["mean"] - 45.91)
    assert df.loc[("imagenet", "MaPLe", "acc")]["n"] == 2
    assert [p.name for p in report.figures] == ["bars_imagenet.png"]  # source + each target, rows as bars
    assert report.figures[0].stat().st_size > 10_000


def test_format_cell_shows_n_and_single_seed_std():
    from orchestrator.report.tables import Cell

    assert format_cell(Cell({1: 80.0, 2: 82.0, 3: 84.0}, 3, 82.0)) == "82.00 ± 2.00"
    assert format_cell(Cell({1: 80.0}, 3, 80.0)) == "80.00 ± – (n=1/3)"
    assert format_cell(Cell({}, 3, None, pending=("running", "running"))) == "missing (0/3, running 2)"


def test_bad_spec_names_the_key():
    spec = spec_dict()
    spec["report"] = "table9"
    with pytest.raises(ValueError, match=r"report: unknown value 'table9'"):
        plan_from_dict(spec)
    spec = spec_dict()
    spec["final"]["seeds"] = [1, "two"]
    with pytest.raises(ValueError, match=r"final\.seeds"):
        plan_from_dict(spec)


def test_missing_store_or_experiment_is_a_clear_error(tmp_path):
    from orchestrator.report import ReportError

    plan = plan_from_dict(spec_dict())
    with pytest.raises(ReportError, match="no MLflow store at"):
        build_report(plan, tmp_path / "r", f"sqlite:///{tmp_path}/nope.db")
    uri, _, _ = write_store(tmp_path, spec_dict(name="other"))
    with pytest.raises(ReportError, match="no MLflow experiment named 'tbl'"):
        build_report(plan, tmp_path / "r", uri)
