"""A spec never deletes what it does not own (issue 19, item 1): reserved keys are refused in search.params as in
the grid, and every deletion goes through orchestrator.paths, which refuses a path outside its owner folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
import yaml

from hisf.config import replace_path
from orchestrator.paths import DeletionRefused, remove_remote_tree, remove_tree
from orchestrator.results import STATUS_KEY, group_result
from orchestrator.resume import DropFinishedCheckpoints, clear_trial_folder, drop_engine_checkpoint
from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.trials import expand_sweep, trials_root
from tests.orchestrator.helpers import demo_raw, write_spec
from tests.support import ROOT


def _demo(params: dict) -> dict:
    raw = demo_raw()
    raw["search"]["params"] = params
    return raw


@pytest.mark.parametrize("key", ["output_dir", "data.root", "data", "protocol", "seed"])
def test_search_params_refuse_reserved_keys_as_the_grid_does(key):
    with pytest.raises(SpecError, match=rf"search\.params\.{key}: not a search key"):
        parse_spec(_demo({key: {"choices": ["/some/folder"]}}))
    if key != "seed":  # a grid's seed axis is the sweep's own seed list
        raw = demo_raw()
        raw["grid"] = {key: ["/some/folder"]}
        with pytest.raises(SpecError, match=rf"grid\.{key}: not a grid key"):
            parse_spec(raw)


def test_the_reported_attack_is_refused_at_load_and_the_folder_survives(tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    raw = _demo({"output_dir": {"choices": [str(victim)]}, "method.lambda_le": {"low": 0.0, "high": 2.0}})
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"evil\.yaml: search\.params\.output_dir: not a search key"):
        load_spec(path)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_remove_tree_deletes_strictly_inside_its_owner_only(tmp_path):
    owner = tmp_path / "hisf-bench" / "runs" / "demo"
    inside = owner / "trial-a"
    (inside / "checkpoint").mkdir(parents=True)
    (inside / "checkpoint" / "state.pt").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (owner / "escape").symlink_to(outside, target_is_directory=True)

    for bad in (outside, owner, owner / ".." / ".." / ".." / "outside", owner / "escape", Path("/")):
        with pytest.raises(DeletionRefused, match="refusing to delete"):
            remove_tree(bad, owner)
    with pytest.raises(DeletionRefused, match="file system root"):
        remove_tree(tmp_path / "x", "/")
    assert (outside / "keep").read_text() == "mine" and owner.is_dir()

    assert remove_tree(inside / "checkpoint" / "state.pt", owner) is True  # a file
    assert remove_tree(inside, owner) is True and not inside.exists()
    assert remove_tree(inside, owner) is False  # already gone: no error


def test_remote_storage_deletions_are_checked_as_paths(tmp_path):
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not LocalFileSystem: compared as strings
    (tmp_path / "ray_results" / "exp" / "checkpoint_000001").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(DeletionRefused):
        remove_remote_tree(fs, "ray_results/../other", "ray_results")
    with pytest.raises(DeletionRefused):
        remove_remote_tree(fs, "other", "ray_results")
    assert remove_remote_tree(fs, "ray_results/exp/checkpoint_000001", "ray_results") is True
    assert (tmp_path / "other").is_dir() and not (tmp_path / "ray_results" / "exp" / "checkpoint_000001").exists()


def test_a_trial_folder_outside_the_workdir_is_never_cleared(tmp_path, demo_root):
    # Even a config that got past the spec checks (here: changed after expansion) cannot make a fresh
    # trial clear a folder outside <workdir>/runs/<spec>/, nor its checkpoint drop reach outside output_dir.
    spec = load_spec(write_spec(tmp_path / "s.yaml", demo_root, rows=[{"name": "CoOp", "method": {"name": "coop"}}]))
    (trial,) = expand_sweep(spec, tmp_path / "wd")
    victim = tmp_path / "victim"
    (victim / "checkpoint").mkdir(parents=True)
    (victim / "checkpoint" / "state.pt").write_text("not ours")
    evil = dataclasses.replace(trial, config=replace_path(trial.config, "output_dir", str(victim)))
    with pytest.raises(DeletionRefused, match=str(trials_root(tmp_path / "wd", spec))):
        clear_trial_folder(evil, trials_root(tmp_path / "wd", spec))
    assert (victim / "checkpoint" / "state.pt").read_text() == "not ours"

    own = Path(trial.config.output_dir)
    (own / "checkpoint").mkdir(parents=True)
    (own / "checkpoint" / "state.pt").write_text("ours")
    (own / "prompts.pt").write_text("kept")
    drop_engine_checkpoint(own)
    assert not (own / "checkpoint").exists() and (own / "prompts.pt").is_file()
    clear_trial_folder(trial, trials_root(tmp_path / "wd", spec))
    assert not own.exists() and trials_root(tmp_path / "wd", spec).is_dir()


def test_tune_copies_outside_the_ray_storage_folder_are_refused(tmp_path):
    stray = tmp_path / "elsewhere" / "trial"
    (stray / "checkpoint_000000").mkdir(parents=True)
    trial = SimpleNamespace(path=str(stray), storage=SimpleNamespace(storage_filesystem=pafs.LocalFileSystem()),
                            last_result=group_result({"t": {STATUS_KEY: "finished"}}),
                            config={"group": {"members": [{"trial_id": "t"}]}})
    cb = DropFinishedCheckpoints(tmp_path / "ray_results")
    with pytest.raises(DeletionRefused, match="ray_results"):
        cb.on_trial_complete(0, [], trial)
    assert (stray / "checkpoint_000000").is_dir()


def test_only_the_deletion_helper_removes_trees():
    """Every tree is deleted by hisf/deletion.py's remove_tree (its owner check); no other module calls rmtree."""
    import ast

    callers = []
    for package in ("hisf", "orchestrator", "data_shards", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr == "rmtree":
                    callers.append(str(path.relative_to(ROOT)))
    assert callers == ["hisf/deletion.py"]
