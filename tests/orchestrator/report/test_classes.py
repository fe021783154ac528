"""The report's worst classes per dataset, read from the runs' eval/<split>.json artifacts in a real MLflow store:
CoOp's issue #24 (DTD at 12-15% on two seeds, 63% on the third) diagnosed class by class."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hisf.class_results import write_class_results
from orchestrator.report import build_report, plan_from_dict
from tests.orchestrator.report.helpers import spec_dict, write_store

CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed"]


def _confusion(per_class_correct: list[int], n: int = 20):
    """A [C, C] count with n images per class, `per_class_correct[c]` of them right, the rest taken for class c+1."""
    c = len(per_class_correct)
    conf = [[0] * c for _ in range(c)]
    for i, right in enumerate(per_class_correct):
        conf[i][i] = right
        conf[i][(i + 1) % c] += n - right
    return conf


def test_worst_classes_per_dataset_with_each_seeds_value(tmp_path):
    spec = spec_dict(datasets=("dtd",), rows=[{"name": "CoOp", "method": {"name": "coop"}},
                                              {"name": "HISF", "method": {"name": "hisf"}}])
    uri, exp, runs = write_store(tmp_path, spec, artifacts=tmp_path / "artifacts")
    client = MlflowClient(uri)
    # CoOp: seeds 1 and 2 collapse on three classes, seed 3 does not; HISF holds every class. HISF seed 3 has no
    # per-class results (a run logged before they existed).
    correct = {("CoOp", 1): [2, 3, 2, 18, 17, 19, 20], ("CoOp", 2): [3, 2, 4, 19, 18, 20, 20],
               ("CoOp", 3): [12, 13, 14, 15, 11, 16, 17], ("HISF", 1): [15, 16, 17, 18, 19, 20, 14],
               ("HISF", 2): [16, 15, 17, 18, 19, 20, 13]}
    for (row, _, dataset, seed), (run_id, _, _) in runs.items():
        if (row, seed) not in correct:
            continue
        folder = tmp_path / "runs" / run_id
        for metric, names, right in (("base_acc", CLASSES, correct[row, seed]),
                                     ("novel_acc", CLASSES[::-1], correct[row, seed])):
            write_class_results(folder, _confusion(right), names, metric, dataset, figure=False)
        client.log_artifacts(run_id, str(folder / "eval"), artifact_path="eval")

    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    cells = {(c.row, c.split): c for c in report.table.worst_classes["dtd"]}
    assert sorted(cells) == [("CoOp", "base"), ("CoOp", "novel"), ("HISF", "base"), ("HISF", "novel")]
    coop = cells["CoOp", "base"]
    assert [c.name for c in coop.classes] == ["banded", "blotchy", "braided", "bumpy", "bubbly"]
    banded = coop.classes[0]
    # Per seed: 2, 3, 12 of 20 right.
    assert banded.values == {1: 10.0, 2: 15.0, 3: 60.0} and banded.mean == pytest.approx(85 / 3)
    assert coop.seeds == (1, 2, 3) and coop.unread == ()
    assert [c.name for c in cells["CoOp", "novel"].classes][:3] == ["cobwebbed", "chequered", "bumpy"]
    hisf = cells["HISF", "base"]
    assert hisf.seeds == (1, 2) and hisf.unread == (3,) and hisf.classes[0].name == "cobwebbed"

    md = report.tables["md"].read_text()
    assert "| CoOp | base | banded | 28.33 | s1 10.0 · s2 15.0 · s3 60.0 |" in md
    assert "No per-class results for 1 run(s) (HISF seed 3)" in md
    html = report.index.read_text()
    assert "<td class=\"cls\">banded</td><td>28.33</td><td class=\"cls\">s1 10.0 · s2 15.0 · s3 60.0</td>" in html
    csv = pd.read_csv(report.tables["worst classes (csv)"])
    row = csv[(csv["row"] == "CoOp") & (csv["split"] == "base") & (csv["class"] == "banded")]
    assert sorted(zip(row.seed, row.accuracy)) == [(1, 10.0), (2, 15.0), (3, 60.0)] and set(row["rank"]) == {1}
    assert len(csv[(csv["row"] == "CoOp") & (csv["split"] == "base")]) == 5 * 3


def test_runs_without_per_class_results_leave_the_section_a_note(tmp_path):
    spec = spec_dict(datasets=("dtd",), seeds=(1, 2))
    uri, exp, runs = write_store(tmp_path, spec, artifacts=tmp_path / "artifacts")
    report = build_report(plan_from_dict(spec), tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    assert all(not c.classes and c.unread == (1, 2) for c in report.table.worst_classes["dtd"])
    assert "No per-class results for 6 run(s)" in report.tables["md"].read_text()
    assert "worst classes (csv)" not in report.tables


def test_a_second_report_reads_finished_runs_records_from_its_cache(tmp_path):
    import shutil

    spec = spec_dict(datasets=("dtd",), rows=[{"name": "CoOp", "method": {"name": "coop"}}])
    uri, exp, runs = write_store(tmp_path, spec, artifacts=tmp_path / "artifacts")
    client = MlflowClient(uri)
    late = None
    for (row, _, dataset, seed), (run_id, _, _) in runs.items():
        folder = tmp_path / "runs" / run_id
        write_class_results(folder, _confusion([seed, 20, 20, 20, 20, 20, 20]), CLASSES, "base_acc", dataset,
                            figure=False)
        if seed == 3:
            late = (run_id, folder)  # its records come after the first report
            continue
        client.log_artifacts(run_id, str(folder / "eval"), artifact_path="eval")
    plan = plan_from_dict(spec)
    first = build_report(plan, tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    cell = next(c for c in first.table.worst_classes["dtd"] if c.split == "base")
    assert cell.seeds == (1, 2) and cell.unread == (3,) and cell.classes[0].values == {1: 5.0, 2: 10.0}
    cached = sorted(p.relative_to(tmp_path / "report") for p in (tmp_path / "report" / ".cache").rglob("*.json"))
    assert len(cached) == 2 and all(p.name == "base.json" for p in cached)

    # The artifact store loses what it held: the finished runs' records are read from the cache; the run that had
    # none then is asked again (a missing record is never cached) and now has one.
    shutil.rmtree(tmp_path / "artifacts")
    client.log_artifacts(late[0], str(late[1] / "eval"), artifact_path="eval")
    second = build_report(plan, tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    cell = next(c for c in second.table.worst_classes["dtd"] if c.split == "base")
    assert cell.seeds == (1, 2, 3) and cell.unread == () and cell.classes[0].values == {1: 5.0, 2: 10.0, 3: 15.0}


def test_a_launch_record_carrying_the_trials_per_class_results_needs_no_artifact(tmp_path):
    from orchestrator.records import clear_record, write_record
    from orchestrator.results import class_summaries

    spec = spec_dict(datasets=("dtd",), rows=[{"name": "CoOp", "method": {"name": "coop"}}])
    uri, exp, runs = write_store(tmp_path, spec, artifacts=tmp_path / "artifacts")
    client = MlflowClient(uri)
    reported = {}
    for (row, _, dataset, seed), (run_id, _, _) in runs.items():
        folder = tmp_path / "runs" / run_id
        for metric in ("base_acc", "novel_acc"):
            write_class_results(folder, _confusion([seed, 20, 20, 20, 20, 20, 20]), CLASSES, metric, dataset,
                                figure=False)
        write_class_results(folder, _confusion([20] * 7), CLASSES, "target/imagenet_a", dataset, figure=False)
        # What the trial reports to the driver: the fields a report reads, every split (a target's too).
        summary = class_summaries(str(folder / "eval"))
        assert sorted(summary) == ["base", "novel", "target/imagenet_a"]
        assert summary["base"] == {"classnames": CLASSES, "per_class_accuracy": [5.0 * seed] + [100.0] * 6}
        tags = client.get_run(run_id).data.tags
        reported[tags["hisf.trial_id"]], parent = summary, tags["mlflow.parentRunId"]
    # The files stay local: no trial run has any in MLflow, so only the launch's record can tell.
    write_record(client, exp, parent, reported)

    # A `--resume` of the launch that ran none of these trials again: its record keeps what they reported.
    clear_record(client, parent)
    write_record(client, exp, parent, {})

    plan = plan_from_dict(spec)
    report = build_report(plan, tmp_path / "report", uri, f"sqlite:///{tmp_path}/none.db")
    cell = next(c for c in report.table.worst_classes["dtd"] if c.split == "base")
    assert cell.seeds == (1, 2, 3) and cell.classes[0].name == "banded"
    assert cell.classes[0].values == {1: 5.0, 2: 10.0, 3: 15.0}
    assert not (tmp_path / "report" / ".cache").exists()  # nothing was downloaded, so nothing cached
    # Read past the record, the same runs have no per-class results at all.
    full = build_report(plan, tmp_path / "full", uri, f"sqlite:///{tmp_path}/none.db", full_read=True)
    assert all(c.unread == (1, 2, 3) for c in full.table.worst_classes["dtd"])
    assert full.table.sections == report.table.sections  # the numbers are the same either way
