"""Trial expansion: counts, stable ids, configs carrying grid/seed/searched values, the dry run."""

import io

import pytest

from orchestrator.context import Options
from orchestrator.estimate import estimate_hours
from orchestrator.spec import SpecError, parse_spec
from orchestrator.status import print_dry_run
from orchestrator.trials import expand_final, expand_sweep, search_groups, search_trial, trial_resources
from tests.orchestrator.helpers import demo_raw


def raw_spec():
    return demo_raw()


def test_sweep_is_rows_by_datasets_by_grid_by_seeds(tmp_path):
    raw = raw_spec()
    raw["data"]["datasets"] = ["demo", "demo2"]
    # Depths 2 and 3 fit every row of the demo (HiCroPL's cross layer 1 needs depth >= 2).
    raw["grid"] = {"method.depth": [2, 3], "train.epochs": [1, 3, 5]}
    spec = parse_spec(raw)
    trials = expand_sweep(spec, tmp_path)
    assert len(trials) == 5 * 2 * 2 * 3 * 3
    assert len({t.trial_id for t in trials}) == len(trials)
    t = next(t for t in trials if t.row == "MaPLe" and t.dataset == "demo2" and t.seed == 2
             and dict(t.point) == {"method.depth": 3, "train.epochs": 5})
    assert t.config.method.depth == 3 and t.config.train.epochs == 5 and t.config.seed == 2
    assert t.config.data.dataset == "demo2" and t.config.data.shots == 4
    assert t.config.method.name == "maple" and t.config.backbone.name == "hisf-tiny"
    assert t.config.output_dir == str(tmp_path.resolve() / "runs" / "demo" / t.trial_id)
    assert t.trial_id == "sweep-maple-demo2-depth3-epochs5-s2"
    # ids are stable across expansions (resume relies on it)
    assert [x.trial_id for x in expand_sweep(spec, tmp_path)] == [x.trial_id for x in trials]


def test_seed_in_grid_replaces_final_seeds(tmp_path):
    raw = raw_spec()
    raw["grid"] = {"seed": [7, 8]}
    del raw["final"], raw["search"], raw["rows"][3]["search"]
    trials = expand_sweep(parse_spec(raw), tmp_path)
    assert sorted({t.seed for t in trials}) == [7, 8] and len(trials) == 10
    assert all(t.config.seed == t.seed for t in trials)


def test_final_takes_best_values_for_searched_rows_only(tmp_path):
    spec = parse_spec(raw_spec())
    (g,) = search_groups(spec, "abc")
    assert g.study == "demo:HISF:demo:abc"
    best = {(g.row, g.dataset, g.point): {"method.lambda_le": 0.25, "method.lambda_sa": 1.5}}
    trials = expand_final(spec, tmp_path, best)
    assert len(trials) == 15
    hisf = [t for t in trials if t.row == "HISF"]
    assert [t.seed for t in hisf] == [1, 2, 3]
    assert all(t.config.method.lambda_le == 0.25 and t.config.method.lambda_sa == 1.5 for t in hisf)
    maple = [t for t in trials if t.row == "MaPLe"]
    assert all(t.config.method.lambda_le == 1.0 for t in maple)
    with pytest.raises(SpecError, match="run `hisf-bench search"):
        expand_final(spec, tmp_path, {})


def test_search_trial_carries_study_and_values(tmp_path):
    spec = parse_spec(raw_spec())
    (g,) = search_groups(spec, "t1")
    t = search_trial(spec, g, 3, 17, {"method.lambda_le": 0.5, "method.lambda_sa": 0.0}, tmp_path)
    assert t.trial_id == "search-hisf-demo-t3"
    assert t.seed == spec.search.seed == t.config.seed
    assert t.config.method.lambda_le == 0.5 and t.config.method.lambda_sa == 0.0
    # The test split never feeds a search: search trials do not evaluate on it; final trials do.
    assert t.config.evaluate_test is False
    assert all(f.config.evaluate_test for f in expand_final(spec, tmp_path, {(g.row, g.dataset, g.point): {}}))
    assert (t.study, t.optuna_number, t.optuna_trial_id) == ("demo:HISF:demo:t1", 3, 17)
    back = type(t).from_payload(t.payload())
    assert back == t


def test_resources_and_dry_run(tmp_path):
    raw = raw_spec()
    raw["resources"].update(gpus_per_trial=0.25, cpus_per_trial=2)
    spec = parse_spec(raw)
    assert trial_resources(spec) == {"cpu": 2.0, "gpu": 0.25}
    raw["resources"].update(gpus_per_trial=1, workers_per_trial=4)
    spec4 = parse_spec(raw)
    assert trial_resources(spec4) == {"cpu": 0.01, "gpu": 0.0}
    trials = expand_sweep(spec4, tmp_path)
    est1 = estimate_hours(spec, expand_sweep(spec, tmp_path))
    est4 = estimate_hours(spec4, trials)
    # GPU-hours scale with the devices a trial holds: 0.25 vs 4 GPUs
    assert est1["gpu_hours"] == pytest.approx(est1["trial_hours"] * 0.25)
    assert est4["gpu_hours"] == pytest.approx(est4["trial_hours"] * 4)
    out = io.StringIO()
    opts = Options(workdir=str(tmp_path), out=out).resolved()
    opts.out = out
    assert print_dry_run("run", spec, opts) == 0
    text = out.getvalue()
    assert text.count("\nfinal ") == 15
    assert "search  demo:HISF:demo: 4 trials" in text
    assert "total: 19 trials" in text
    assert not (tmp_path / "mlflow.db").exists()


def test_a_runs_params_hold_the_keys_its_method_reads_and_what_the_spec_varies(tmp_path):
    from orchestrator.trial_callback import tracked_params

    raw = raw_spec()
    raw["grid"] = {"method.lambda_le": [0.5, 1.0]}  # read by HISF only, varied for every row
    spec = parse_spec(raw)
    by_row = {t.row: t for t in expand_sweep(spec, tmp_path) if dict(t.point)["method.lambda_le"] == 0.5}
    params = {row: tracked_params(t) for row, t in by_row.items()}
    method_keys = {row: sorted(k for k in p if k.startswith("method.")) for row, p in params.items()}
    assert method_keys["CLIP"] == ["method.lambda_le", "method.name"]  # the grid's key stays: reports need it
    assert method_keys["CoOp"] == ["method.ctx_init", "method.lambda_le", "method.n_ctx", "method.name"]
    assert not {"method.lkp_heads", "method.lambda_distill", "method.cross_layer", "method.mapping"} & set(params["HISF"])
    assert {"method.fusion_heads", "method.lambda_sa", "method.pi", "method.depth"} <= set(params["HISF"])
    assert {"method.lkp_heads", "method.cross_layer", "method.lambda_distill"} <= set(params["HiCroPL"])
    assert not {"method.fusion_heads", "method.lambda_sa"} & set(params["HiCroPL"])
    # Everything outside method.* is logged as before.
    for row, t in by_row.items():
        flat = t.config.flatten()
        assert {k: v for k, v in flat.items() if not k.startswith("method.")} == {
            k: v for k, v in params[row].items() if not k.startswith("method.")}
    assert len(params["HISF"]) < len(by_row["HISF"].config.flatten()) - 5
    # A searched key is kept for every row it varies (the trial's point carries it).
    demo = parse_spec(raw_spec())
    searched = search_trial(demo, search_groups(demo)[0], 0, 1, {"method.lambda_le": 0.3, "method.lambda_sa": 0.7},
                            tmp_path)
    assert {"method.lambda_le", "method.lambda_sa"} <= set(tracked_params(searched))
