"""HiCroPL in specs, dry runs and reports: published settings per row, descriptions checked before Ray starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hisf.config import TrialConfig
from orchestrator.spec import SpecError, check_descriptions, load_spec, parse_spec
from tests.orchestrator.helpers import cli_env, write_spec
from tests.orchestrator.report.helpers import spec_dict, write_store
from tests.support import ROOT

EXPERIMENTS = ROOT / "experiments"
DEMO_CLASSES = ("red circle", "green square", "blue triangle", "yellow cross", "magenta ring", "cyan bars")


def _row_config(spec, name: str) -> TrialConfig:
    return TrialConfig.from_dict(spec.trial_dict(spec.row(name), spec.data.datasets[0]))


@pytest.mark.parametrize("spec_name, n_ctx, depth, k, epochs", [
    ("base2new", 16, 12, 6, 50),
    ("cross_dataset", 2, 6, 5, 5),
    ("domain_generalization", 2, 6, 5, 5),
])
def test_hicropl_rows_carry_the_published_settings(spec_name, n_ctx, depth, k, epochs):
    spec = load_spec(EXPERIMENTS / f"{spec_name}.yaml")
    cfg = _row_config(spec, "HiCroPL")
    m, t = cfg.method, cfg.train
    assert (m.name, m.n_ctx, m.depth, m.cross_layer, m.lambda_distill, m.mapping) == (
        "hicropl", n_ctx, depth, k, 12.0, "learned")
    assert (t.preset, t.batch_size, t.epochs) == ("hicropl", 32, epochs)
    # The row's train section overrides base key by key: base's precision and warm-up stay.
    assert (t.precision, t.warmup_epochs, t.warmup_lr) == ("fp16", 1, 1e-5)
    assert m.descriptions == "data/gpt_file"
    # The other rows keep the base recipe.
    assert _row_config(spec, "MaPLe").train.batch_size == 4 and _row_config(spec, "MaPLe").train.preset == "paper"


def test_mapping_spec_runs_learned_against_released_with_the_released_settings():
    spec = load_spec(EXPERIMENTS / "hicropl_mapping.yaml")
    assert [r.name for r in spec.rows] == ["HiCroPL learned", "HiCroPL released", "HiCroPL released shared"]
    assert spec.data.datasets == load_spec(EXPERIMENTS / "base2new.yaml").data.datasets
    for row, mapping, storage in (("HiCroPL learned", "learned", None), ("HiCroPL released", "released", "per_layer"),
                                  ("HiCroPL released shared", "released", "shared")):
        cfg = _row_config(spec, row)
        assert (cfg.method.mapping, cfg.method.released_storage) == (mapping, storage)
        assert (cfg.method.n_ctx, cfg.method.depth, cfg.method.cross_layer, cfg.method.lambda_distill) == (
            16, 12, 6, 12.0)
        assert (cfg.train.preset, cfg.train.batch_size, cfg.train.epochs) == ("hicropl", 32, 50)


def test_dry_run_lists_the_hicropl_trials_with_their_settings(tmp_path):
    """`hisf-bench run experiments/base2new.yaml --dry-run` from the repository (no data built)."""
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(EXPERIMENTS / "base2new.yaml"),
                          "--dry-run", "--workdir", str(tmp_path / "wd")], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    # The plan is printed; then the pre-flight says the real run would stop (no data built, no weights cached).
    assert out.returncode == 2, out.stderr[-3000:]
    assert "no built dataset 'imagenet'" in out.stderr
    lines = [l for l in out.stdout.splitlines() if re.match(r"final\s+final-hicropl-", l)]
    assert len(lines) == 11 * 3
    gpt = tmp_path / "data" / "gpt_file"
    assert lines[0] == (f"final   final-hicropl-imagenet-s1: method hicropl, dataset imagenet, seed 1, epochs 50, "
                        f"n_ctx 16, depth 12, cross_layer 6, lambda_distill 12.0, mapping learned, "
                        f"descriptions {gpt}, preset hicropl, batch 32")
    assert {l.split(": ", 1)[1].split(", ", 3)[1] for l in lines} == {
        f"dataset {d}" for d in load_spec(EXPERIMENTS / "base2new.yaml").data.datasets}
    # The descriptions cannot be checked against class names of datasets not built yet: said, not failed.
    assert "note    rows[4] (HiCroPL): descriptions 'data/gpt_file' not checked for imagenet, caltech101" in out.stdout


# ----- descriptions checked before Ray starts ---------------------------------------------------------------

def _descriptions(tmp_path: Path, table) -> Path:
    p = tmp_path / "desc.json"
    p.write_text(table if isinstance(table, str) else json.dumps(table))
    return p


def _good_table() -> dict:
    return {name: [f"a picture of a {name}.", f"one {name} on grey."] for name in DEMO_CLASSES}


def _hicropl_spec(tmp_path: Path, demo_root: Path, descriptions, **method) -> Path:
    row = {"name": "HiCroPL", "method": {"name": "hicropl", "n_ctx": 2, "depth": 2, "cross_layer": 1,
                                         "descriptions": str(descriptions), **method}}
    return write_spec(tmp_path / "spec.yaml", demo_root, rows=[row], name="hc")


def test_good_descriptions_pass_and_relative_paths_resolve_on_the_driver(tmp_path, demo_root, monkeypatch):
    from data_shards.demo import write_descriptions
    from orchestrator.trials import expand_sweep

    folder = tmp_path / "descriptions"
    write_descriptions(folder)
    spec = load_spec(_hicropl_spec(tmp_path, demo_root, folder))
    assert check_descriptions(spec) == []
    # A JSON file works as well as a CoPrompt-style folder; `templates` needs no file.
    assert check_descriptions(load_spec(_hicropl_spec(tmp_path, demo_root, _descriptions(tmp_path, _good_table())))) == []
    assert check_descriptions(load_spec(_hicropl_spec(tmp_path, demo_root, "templates"))) == []
    # Trials run in Ray workers' own folders: a relative path reaches them resolved where the driver runs.
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_hicropl_spec(tmp_path, demo_root, "descriptions"))
    (trial,) = expand_sweep(spec, tmp_path / "wd")
    assert trial.config.method.descriptions == str(folder.resolve())


@pytest.mark.parametrize("table, message", [
    ("{not json", r"desc\.json: not a readable JSON file"),
    (["red circle", "green square"], r"desc\.json: expected a JSON object \{class name: \[sentences\]\}, got a list"),
    ({**_good_table(), "red circle": "a red circle."}, r"desc\.json: class 'red circle': expected a list of sentences"),
    ({**_good_table(), "magenta ring": []}, r"desc\.json: class 'magenta ring' \(key 'magenta ring'\) has an empty sentence list"),
    ({k: v for k, v in _good_table().items() if k != "cyan bars"}, r"desc\.json: no description for class 'cyan bars'"),
])
def test_bad_descriptions_fail_at_validation_naming_file_and_class(tmp_path, demo_root, table, message):
    spec = load_spec(_hicropl_spec(tmp_path, demo_root, _descriptions(tmp_path, table)))
    with pytest.raises(SpecError, match=r"spec\.yaml: rows\[0\] \(HiCroPL\) method\.descriptions on dataset 'demo': .*"
                       + message):
        check_descriptions(spec)


def test_folder_without_the_datasets_file_and_unknown_mapping(tmp_path, demo_root):
    folder = tmp_path / "gpt_file"
    folder.mkdir()
    (folder / "caltech_prompt.json").write_text(json.dumps({"face": ["a face."]}))
    spec = load_spec(_hicropl_spec(tmp_path, demo_root, folder))
    with pytest.raises(SpecError, match=r"gpt_file: no descriptions file 'demo_prompt.json' for dataset 'demo'; "
                                        r"the folder has \['caltech_prompt.json'\]"):
        check_descriptions(spec)
    raw = yaml.safe_load(_hicropl_spec(tmp_path, demo_root, "templates", mapping="paper").read_text())
    with pytest.raises(SpecError, match=r"rows\[0\] \(HiCroPL\) merged with base: method\.mapping: unknown value "
                                        r"'paper'; expected one of \['learned', 'released'\]"):
        parse_spec(raw)


@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_descriptions_stop_the_cli_before_ray_starts(tmp_path, demo_root, dry_run):
    bad = {k: v for k, v in _good_table().items() if k != "blue triangle"}
    spec = _hicropl_spec(tmp_path, demo_root, _descriptions(tmp_path, bad))
    # (Option parsing imports Ray's modules; what must not happen is a Ray session or any store being made.)
    code = ("import sys; from orchestrator.cli import main; rc = main(sys.argv[1:]);"
            "ray = sys.modules.get('ray'); print('RAY_STARTED' if ray and ray.is_initialized() else 'NO_RAY');"
            "sys.exit(rc)")
    args = ["run", str(spec), "--workdir", str(tmp_path / "wd")] + (["--dry-run"] if dry_run else [])
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         env=cli_env(), timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{tmp_path / 'desc.json'}: no description for class 'blue triangle'" in out.stderr
    assert "rows[0] (HiCroPL) method.descriptions on dataset 'demo'" in out.stderr
    assert "NO_RAY" in out.stdout
    assert not (tmp_path / "wd").exists()  # no store, no trial folder: nothing started


# ----- reports --------------------------------------------------------------------------------------------

def test_report_rows_say_which_mapping_produced_each_number(tmp_path):
    from orchestrator.report import build_report, plan_from_dict

    raw = yaml.safe_load((EXPERIMENTS / "hicropl_mapping.yaml").read_text())
    rows = [{"name": r["name"], "method": {**raw["base"]["method"], **r["method"]}} for r in raw["rows"]]
    from orchestrator.report.plan import PAPER_DATASETS

    # The 11 datasets of Table 1, 16 shots, ViT-B/16: numbers made as the paper's, so its row stands beside them.
    spec = spec_dict(name="hicropl_mapping", rows=rows, datasets=PAPER_DATASETS)
    spec.pop("search")
    uri, _, runs = write_store(tmp_path, spec)
    report = build_report(plan_from_dict(spec), tmp_path / "rep", uri, f"sqlite:///{tmp_path}/none.db")
    df = pd.read_parquet(report.tables["parquet"])
    avg = df[df.section == "Average"].set_index(["row", "column"])
    for row in ("HiCroPL learned", "HiCroPL released"):
        per_seed = [sum(runs[(row, (), d, s)][1]["base_acc"] for d in PAPER_DATASETS) / len(PAPER_DATASETS)
                    for s in (1, 2, 3)]
        assert avg.loc[(row, "base_acc")]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert avg.loc[("HiCroPL (paper)", "base_acc")]["mean"] == 85.89
    assert avg.loc[("HiCroPL (paper)", "novel_acc")]["mean"] == 77.99
    assert avg.loc[("HiCroPL (paper)", "hm")]["mean"] == 81.75
    md = report.tables["md"].read_text()
    assert "| HiCroPL learned |" in md and "| HiCroPL released |" in md
    assert "| HiCroPL (paper) | 85.89 | 77.99 | 81.75 |" in md


def test_a_mapping_grid_labels_each_variant(tmp_path):
    """One HiCroPL row with a grid over method.mapping: the variant label names the mapping."""
    from orchestrator.report import build_report, plan_from_dict

    spec = spec_dict(name="hcgrid", rows=[{"name": "HiCroPL", "method": {"name": "hicropl"}}],
                     grid={"method.mapping": ["learned", "released"]})
    spec.pop("search")
    plan = plan_from_dict(spec)
    assert [v.label for v in plan.variants] == ["HiCroPL mapping=learned", "HiCroPL mapping=released"]
    uri, _, runs = write_store(tmp_path, spec, variants=[(("method.mapping", "learned"),),
                                                         (("method.mapping", "released"),)])
    report = build_report(plan, tmp_path / "rep", uri, f"sqlite:///{tmp_path}/none.db")
    ours = pd.read_parquet(report.tables["parquet"]).set_index(["section", "row", "column"])
    for mapping in ("learned", "released"):
        vals = [runs[("HiCroPL", (("method.mapping", mapping),), "caltech101", s)][1]["hm"]
                for s in (1, 2, 3)]
        assert ours.loc[("caltech101", f"HiCroPL mapping={mapping}", "hm")]["mean"] == pytest.approx(sum(vals) / 3)
