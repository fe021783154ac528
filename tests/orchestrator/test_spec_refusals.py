"""Errors that would repeat in every retry are refused when the spec loads (so by `--dry-run` too), before Ray:
settings the backbone's shape cannot take, every searched value, non-finite numbers, out-of-range seeds,
names that would leave their folder, duplicated YAML keys (issue 19 items 5, 9, 10)."""

import subprocess
import sys

import pytest
import yaml

from orchestrator.cli import main as cli_main
from orchestrator.spec import SpecError, load_spec, parse_spec
from tests.orchestrator.helpers import DEMO_SPEC, demo_raw
from tests.support import ROOT

DEMO = DEMO_SPEC
NAN, INF = float("nan"), float("inf")
# hisf-tiny (hisf/model/model_configs/hisf-tiny.json): 3 text and 3 vision layers, widths 64, context 77.
TINY = "backbone 'hisf-tiny'"



def method(row: int, **kw):
    return lambda r: r["rows"][row]["method"].update(kw)


def param(key, **rng):
    return lambda r: r["search"]["params"].update({key: rng})


@pytest.mark.parametrize("mutate, message", [
    # the backbone's shape, read from its model config (no weights, no model build)
    (method(2, depth=4), f"rows[2] (MaPLe) merged with base: method.depth: 4 exceeds the 3 layers of {TINY}; "
                         "expected 1..3"),
    (method(4, depth=5, cross_layer=1), "rows[4] (HiCroPL) merged with base: method.depth: 5 exceeds the 3 layers"),
    (method(1, n_ctx=74), f"rows[1] (CoOp) merged with base: method.n_ctx: 74 does not fit the context length 77 of "
                          f"{TINY}; expected 1..73"),
    (method(2, layers=[0, 3]), f"rows[2] (MaPLe) merged with base: method.layers: prompt layers [0, 3] outside the 3 "
                               f"layers of {TINY}; expected indices in 0..2"),
    (method(3, fusion_heads=5), f"rows[3] (HISF) merged with base: method.fusion_heads: 5 heads do not divide the "
                                f"text width 64 of {TINY}"),
    (method(4, lkp_heads=3), f"rows[4] (HiCroPL) merged with base: method.lkp_heads: 3 heads do not divide the text "
                             f"width 64 of {TINY}"),
    (method(4, mapper_heads=6), "method.mapper_heads: 6 heads do not divide the text width 64"),
    (lambda r: r["rows"][1].update(backbone={"name": "ViT-Q-99"}),
     "rows[1] (CoOp) merged with base: backbone.name: unknown model 'ViT-Q-99'"),
    # numbers: non-finite values, negative seeds and momentum
    (lambda r: r["base"]["train"].update(lr=NAN), "train.lr: expected a finite number, got nan"),
    (lambda r: r["base"]["train"].update(lr=INF), "train.lr: expected a finite number, got inf"),
    (lambda r: r["base"]["train"].update(momentum=-0.5), "train.momentum: expected 0 <= momentum < 1, got -0.5"),
    (lambda r: r["base"]["train"].update(weight_decay=-1e-4), "train.weight_decay: expected >= 0, got -0.0001"),
    (method(3, lambda_le=-INF), "method.lambda_le: expected a finite number, got -inf"),
    (lambda r: r["base"].update(seed=-1), "seed: expected an integer in 0..4294967295, got -1"),
    (lambda r: r["final"].update(seeds=[1, -2]), "final.seeds[1]: expected an integer in 0..4294967295, got -2"),
    (lambda r: r["search"].update(seed=2**32), "search.seed: expected an integer in 0..4294967295, got 4294967296"),
    (param("method.lambda_le", low=NAN, high=1.0), "search.params.method.lambda_le.low: expected a finite number, got nan"),
    (param("method.lambda_le", low=0.0, high=INF), "search.params.method.lambda_le.high: expected a finite number"),
    (lambda r: r["resources"].update(cpus_per_trial=INF), "resources.cpus_per_trial: expected a finite number, got inf"),
    # every searched value, not only the first
    (param("method.lambda_le", choices=[0.5, 1.0, -1.0]),
     "search.params.method.lambda_le.choices[2]: method.lambda_le: expected a weight >= 0, got -1.0 (rows[3] (HISF))"),
    (param("method.depth", choices=[1, 2, 4]), f"search.params.method.depth.choices[2]: method.depth: 4 exceeds the 3 "
                                               f"layers of {TINY}"),
    (param("train.lr", low=-1.0, high=1.0), "search.params.train.lr.low: train.lr: expected > 0, got -1.0"),
    (param("method.depth", low=1, high=4, int=True), "search.params.method.depth.high: method.depth: 4 exceeds"),
    # an integer range is checked at every integer it can draw: 3 heads do not divide the width 64
    (param("method.fusion_heads", low=1, high=4, int=True),
     "search.params.method.fusion_heads = 3 (between low and high): method.fusion_heads: 3 heads do not divide"),
    (param("method.depth", low=1.5, high=3, int=True),
     "search.params.method.depth.low: an integer range (int: true) needs integer bounds, got 1.5"),
    (param("method.depth", low=1, high=3), "search.params.method.depth.low: method.depth: expected an integer, got 1.0; "
                                           "method.depth takes integers: add `int: true` to the range"),
    (lambda r: r["search"].update(metric="val_loss"),
     "search.metric: 'val_loss' is not a metric a search trial reports; expected one of ['val_acc']"),
    # grid values against the backbone, naming the row they fail on
    (lambda r: r.update(grid={"method.depth": [2, 4]}), "grid.method.depth[1]: method.depth: 4 exceeds the 3 layers"),
])
def test_repeating_errors_are_refused_at_spec_load(mutate, message):
    raw = demo_raw()
    mutate(raw)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert message in str(e.value)


def test_a_grid_point_is_checked_whole():
    """Each axis value alone fits; together (depth 2, cross layer 2) they do not: the point is named."""
    raw = demo_raw()
    raw["rows"] = [raw["rows"][4]]
    raw["rows"][0]["method"]["depth"] = 3
    raw.pop("search")
    raw["grid"] = {"method.depth": [3, 2], "method.cross_layer": [1, 2]}
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert ("grid point {method.depth: 2, method.cross_layer: 2}: method.cross_layer: k=2 outside 1..1 (1 <= k <= "
            "depth-1 with depth 2) (rows[0] (HiCroPL))") in str(e.value)


def test_what_a_grid_or_the_search_sets_is_not_held_against_the_row():
    """The row's own value never reaches a trial when a grid axis or the search sets the key."""
    raw = demo_raw()
    raw["rows"][2]["method"].pop("depth")  # MaPLe's default depth 9: more than the tiny model's 3 layers
    raw["grid"] = {"method.depth": [2, 3]}
    parse_spec(raw)
    raw["grid"] = {"train.lr": [0.01]}  # a grid that does not set the depth: the trial would get 9
    with pytest.raises(SpecError, match=r"grid.train.lr\[0\]: method.depth: 9 exceeds the 3 layers .* \(rows\[2\] "
                                        r"\(MaPLe\)\)"):
        parse_spec(raw)
    raw = demo_raw()
    raw["rows"][3]["method"].pop("depth")  # HISF, searched: every trial takes the depth from the search
    raw["search"]["params"]["method.depth"] = {"choices": [1, 3]}
    assert parse_spec(raw).search.params[-1].choices == (1, 3)
    # HiCroPL searched over depth and cross layer: a pair that does not fit (depth 2, k 2) is known only when a
    # study draws it; it fails that trial at once (a ConfigError), so the spec loads.
    raw = demo_raw()
    raw["rows"][4]["search"] = True
    raw["search"]["params"] = {"method.depth": {"low": 2, "high": 3, "int": True},
                               "method.cross_layer": {"low": 1, "high": 2, "int": True}}
    parse_spec(raw)
    raw["search"]["params"]["method.depth"]["high"] = 4  # but 4 exceeds the model whatever k is
    with pytest.raises(SpecError, match=r"search.params.method.depth.high: method.depth: 4 exceeds .* \(rows\[3\] "
                                        r"\(HISF\)\)"):
        parse_spec(raw)


def test_a_backbone_grid_axis_is_checked_against_each_backbone():
    raw = demo_raw()
    raw["grid"] = {"backbone.model_cfg": [None, {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32,
                                                 "patch_size": 8, "image_size": 32, "head_width": 16},
                                                 "text_cfg": {"layers": 1, "width": 32, "heads": 2}}]}
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert "grid.backbone.model_cfg[1]: method.depth: 2 exceeds the 1 layer of backbone.model_cfg; expected 1..1 " \
           "(rows[2] (MaPLe))" in str(e.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(name=".."), "name: '..' is not a plain name"),
    (lambda r: r.update(name="a:b"), "name: 'a:b' is not a plain name"),
    (lambda r: r.update(name="runs/x"), "name: 'runs/x' is not a plain name"),
    (lambda r: r["data"].update(datasets=["../demo"]), "data.datasets[0]: '../demo' is not a dataset name"),
    (lambda r: r["data"].update(targets=["demo", "a/b"]), "data.targets[1]: 'a/b' is not a dataset name"),
    (lambda r: r["rows"].append({"name": "hisf", "method": {"name": "hisf"}}),
     "rows[5].name: 'hisf' and rows[3].name 'HISF' give the same trial ids and folders ('hisf')"),
    (lambda r: r["rows"].append({"name": "Co-Op?", "method": {"name": "coop"}}) or r["rows"].append(
        {"name": "Co-Op!", "method": {"name": "coop"}}), "rows[6].name: 'Co-Op!' and rows[5].name 'Co-Op?'"),
    (lambda r: r["rows"][0].update(name="  "), "rows[0].name: expected a non-empty label"),
])
def test_names_that_would_leave_their_folder_or_collide_are_refused(mutate, message):
    raw = demo_raw()
    mutate(raw)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert message in str(e.value)


def test_a_data_root_that_is_a_file_is_refused(tmp_path):
    raw = demo_raw()
    (tmp_path / "f").write_text("")
    raw["data"]["root"] = str(tmp_path / "f")
    with pytest.raises(SpecError, match=f"data.root: {tmp_path / 'f'} is a file; expected a folder"):
        parse_spec(raw)


def test_duplicated_keys_are_refused_with_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    text = DEMO.read_text().replace("  shots: 4\n", "  shots: 4\n  num_workers: 0\n  shots: 16\n", 1)
    p.write_text(text)
    first = text.splitlines().index("  shots: 4") + 1
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"dup.yaml: not valid YAML: duplicate key 'shots' at line {first + 2} (first at line {first})" in str(e.value)
    # a nested mapping and a flow mapping too
    p.write_text(DEMO.read_text().replace("{name: coop}", "{name: coop, name: maple}"))
    with pytest.raises(SpecError, match=r"duplicate key 'name' at line 19, column 39 \(first at column 27\)"):
        load_spec(p)


def test_yaml_merge_keys_still_override():
    """`<<: *anchor` then an explicit key is YAML's own override, not a duplicate."""
    from hisf.yaml_io import load_yaml

    assert load_yaml("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n") == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}


def test_dry_run_refuses_a_depth_beyond_the_model_and_a_dot_dot_name(tmp_path, capsys):
    raw = demo_raw()
    raw["rows"][2]["method"]["depth"] = 7
    p = tmp_path / "deep.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(p), "--dry-run", "--workdir", str(tmp_path / "wd")]) == 2
    assert "rows[2] (MaPLe) merged with base: method.depth: 7 exceeds the 3 layers" in capsys.readouterr().err
    raw = demo_raw()
    raw["name"] = ".."
    p.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(p), "--dry-run", "--workdir", str(tmp_path / "wd")]) == 2
    assert "name: '..' is not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()


def test_a_real_run_refuses_it_before_ray_starts(tmp_path):
    raw = demo_raw()
    raw["search"]["params"]["method.lambda_sa"] = {"choices": [0.5, -2.0]}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    code = ("import sys; from orchestrator.cli import main; rc = main(['run', sys.argv[1], '--workdir', sys.argv[2]]);"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(p), str(tmp_path / "wd")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "search.params.method.lambda_sa.choices[1]: method.lambda_sa: expected a weight >= 0, got -2.0" in out.stderr
    assert "NO_RAY" in out.stdout
    assert not (tmp_path / "wd").exists()


def test_the_experiments_specs_still_load():
    # experiments/trial.yaml is a single trial's config (`hisf-bench train`), not a spec: it loads as a TrialConfig.
    from hisf.config import TrialConfig

    specs = [p for p in sorted((ROOT / "experiments").glob("*.yaml")) if p.name != "trial.yaml"]
    assert len(specs) >= 8
    for p in specs:
        assert load_spec(p).name == p.stem
    assert TrialConfig.from_yaml(ROOT / "experiments" / "trial.yaml").method.name
