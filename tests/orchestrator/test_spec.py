"""Spec validation: every bad key or value fails before Ray starts, naming its key path."""

import subprocess
import sys

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_spec
from tests.orchestrator.helpers import DEMO_SPEC, demo_raw
from tests.support import ROOT

DEMO = DEMO_SPEC



def test_demo_spec_loads_into_frozen_dataclasses():
    spec = load_spec(DEMO)
    assert spec.name == "demo" and spec.protocol == "base2new"
    assert [r.name for r in spec.rows] == ["CLIP", "CoOp", "MaPLe", "HISF", "HiCroPL"]
    assert [r.name for r in spec.searched_rows] == ["HISF"]
    assert spec.final.seeds == (1, 2, 3)
    assert [p.key for p in spec.search.params] == ["method.lambda_le", "method.lambda_sa"]
    assert spec.search.params[0].low == 0.0 and spec.search.params[0].high == 2.0
    assert spec.resources.max_concurrent_trials == 2
    assert len(spec.hash) == 12
    with pytest.raises(Exception):
        spec.name = "other"


def test_hash_changes_with_content():
    raw = demo_raw()
    a = parse_spec(raw)
    raw["search"]["n_trials"] = 5
    assert parse_spec(raw).hash != a.hash
    assert parse_spec(demo_raw()).hash == a.hash


@pytest.mark.parametrize("mutate, key_path", [
    (lambda r: r.update(colour="red"), "colour: unknown key"),
    (lambda r: r["data"].update(shot=4), "data.shot: unknown key"),
    (lambda r: r["data"].update(shots=0), "data.shots: expected an integer >= 1"),
    (lambda r: r.update(protocol="b2n"), "protocol: unknown value 'b2n'"),
    (lambda r: r["search"]["params"]["method.lambda_le"].update(low="zero"), "search.params.method.lambda_le.low: expected a number"),
    (lambda r: r["search"]["params"]["method.lambda_le"].update(high=-1.0), "search.params.method.lambda_le.high: expected > low"),
    (lambda r: r["search"]["params"].update({"method.lambda_xx": {"low": 0, "high": 1}}), "search.params.method.lambda_xx"),
    (lambda r: r["search"].update(metric="acc"), "search.metric: expected a validation metric"),
    (lambda r: r["search"].update(sampler="cmaes"), "search.sampler: unknown value"),
    (lambda r: r["rows"][1]["method"].update(name="coop2"), "rows[1] (CoOp) merged with base: method.name: unknown value 'coop2'"),
    (lambda r: r["rows"][2]["method"].update(deepth=3), "rows[2] (MaPLe) merged with base: method.deepth: unknown key"),
    (lambda r: r["base"]["train"].update(epochs="two"), "train.epochs: expected an integer"),
    (lambda r: r.update(grid={"method.depth": [1, 0]}), "grid.method.depth[1]: method.depth: expected an integer >= 1"),
    (lambda r: r.update(grid={"method.depth": 3}), "grid.method.depth: expected a non-empty list"),
    (lambda r: r["resources"].update(gpus_per_trial=1.5), "resources.gpus_per_trial"),
    (lambda r: r["resources"].update(workers_per_trial=2, gpus_per_trial=0.5), "resources.gpus_per_trial: a DDP trial"),
    (lambda r: r["final"].update(seeds=[1, 1]), "final.seeds: duplicated seed"),
    (lambda r: r.pop("search"), "rows[3].search: row 'HISF' is searched but the spec has no `search:` section"),
    (lambda r: r["rows"].append({"name": "CLIP", "method": {"name": "zeroshot"}}), "rows[5].name: duplicated row name"),
    (lambda r: r["base"].update(output_dir="x"), "base.output_dir: set by the spec itself"),
])
def test_bad_values_name_their_key_path(mutate, key_path):
    raw = demo_raw()
    mutate(raw)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert key_path in str(e.value)


def test_load_spec_names_the_file(tmp_path):
    raw = demo_raw()
    raw["data"]["shots"] = -3
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"bad\.yaml: data\.shots: expected an integer >= 1, got -3"):
        load_spec(p)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.yaml")


def test_bad_spec_fails_before_ray_starts(tmp_path):
    """The CLI exits 2 with the key path, without importing Ray (so nothing was started)."""
    raw = demo_raw()
    raw["resources"]["max_concurrent_trials"] = 0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    code = ("import sys; from orchestrator.cli import main; rc = main(['run', sys.argv[1], '--workdir', sys.argv[2]]);"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(p), str(tmp_path / "wd")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "resources.max_concurrent_trials: expected an integer >= 1, got 0" in out.stderr
    assert "NO_RAY" in out.stdout
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("drop, named", [((), "`search:` or `final:`"), (("search",), "`final:`"), (("final",), "`search:`")])
def test_seed_axis_in_grid_with_search_or_final_is_refused(drop, named):
    """A grid `seed` axis next to search/final used to expand into colliding trial ids and study names."""
    raw = demo_raw()
    raw["grid"] = {"seed": [1, 2], "method.depth": [2, 3]}
    for section in drop:
        raw.pop(section)
        if section == "search":
            raw["rows"][3].pop("search")
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert f"grid.seed: a seed axis cannot be combined with {named} (" in str(e.value)
    assert "final.seeds" in str(e.value)
    # without both sections the seed axis is the sweep's seed list
    for section in ("search", "final"):
        raw.pop(section, None)
    raw["rows"][3].pop("search", None)
    spec = parse_spec(raw)
    assert dict(spec.grid)["seed"] == (1, 2)
