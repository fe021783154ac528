"""Fused groups on the orchestrator side (docs/fusion.md), without Ray: which trials share a group and why one runs
alone, how `resources.fuse` sizes groups (a number, or `auto` from the memory estimate or the CPU rule), the memory
estimate itself, the payload a Tune trial carries, and what the dry run prints and estimates."""

import io
import json
import re

import pytest
import yaml

from hisf.config import replace_path
from hisf.engine.group import check_group, fusion_key
from orchestrator.context import Options
from orchestrator.estimate import estimate_hours
from orchestrator.groups import (
    CPU_AUTO,
    CPU_SEQUENCES,
    MAX_AUTO,
    MEMORY_SHARE,
    TrialGroup,
    estimate_peak_bytes,
    group_size,
    plan_groups,
)
from orchestrator.spec import SpecError, parse_spec
from orchestrator.status import print_dry_run
from orchestrator.trials import expand_final, expand_sweep, search_groups
from tests.orchestrator.helpers import demo_raw

GIB = 1024 ** 3


def raw_spec(**resources):
    raw = demo_raw()
    raw["resources"].update(resources)
    return raw


def three_classes(_key):
    return 3


def final_trials(spec, tmp_path):
    best = {(g.row, g.dataset, g.point): {"method.lambda_le": 0.25, "method.lambda_sa": 1.5}
            for g in search_groups(spec, "abc")}
    return expand_final(spec, tmp_path, best)


@pytest.mark.parametrize("fuse", [1, 2, 3, 8])
def test_groups_cover_each_trial_once_share_a_fusion_key_and_keep_plan_order(tmp_path, fuse):
    raw = raw_spec(fuse=fuse)
    raw["final"]["seeds"] = [1, 2, 3, 4, 5]
    spec = parse_spec(raw)
    trials = final_trials(spec, tmp_path)
    groups, alone = plan_groups(trials, spec, three_classes)

    ids = [t.trial_id for g in groups for t in g.members]
    assert sorted(ids) == sorted(t.trial_id for t in trials)  # every trial exactly once
    for g in groups:
        assert len(g.members) <= fuse
        assert len({fusion_key(t.config) for t in g.members}) == 1
        check_group([t.config for t in g.members])  # the engine accepts what the planner groups
    # Groups come in plan order (by their first member), members in plan order within a group.
    order = {t.trial_id: i for i, t in enumerate(trials)}
    firsts = [order[g.members[0].trial_id] for g in groups]
    assert firsts == sorted(firsts)
    assert all([order[t.trial_id] for t in g.members] == sorted(order[t.trial_id] for t in g.members) for g in groups)
    # Five seeds of a row, split as evenly as the size allows (5 at most 2: 1 + 2 + 2; at most 3: 2 + 3).
    sizes = sorted(len(g.members) for g in groups if g.members[0].row == "CoOp")
    assert sizes == {1: [1] * 5, 2: [1, 2, 2], 3: [2, 3], 8: [5]}[fuse]
    # A trial alone always says why.
    singles = {g.members[0].trial_id for g in groups if len(g.members) == 1}
    assert set(alone) == singles and all(alone.values())
    if fuse == 1:
        assert all(r == "resources.fuse is 1" for r in alone.values())


def test_rows_never_share_a_group_and_a_group_id_is_its_first_member(tmp_path):
    spec = parse_spec(raw_spec(fuse=8))
    trials = final_trials(spec, tmp_path)
    groups, _ = plan_groups(trials, spec, three_classes)
    assert all(len({t.row for t in g.members}) == 1 for g in groups)
    assert len(groups) == len({t.row for t in trials})  # three seeds per row, each row one group
    g = groups[0]
    assert g.group_id == f"{g.members[0].trial_id}-x{len(g.members)}"
    single = TrialGroup((trials[0],))
    assert single.group_id == trials[0].trial_id  # a trial alone keeps its own id as its Tune trial name
    back = TrialGroup.from_payload(yaml.safe_load(yaml.safe_dump(g.payload())))
    assert [t.trial_id for t in back.members] == [t.trial_id for t in g.members]
    assert [t.config.flatten() for t in back.members] == [t.config.flatten() for t in g.members]


def test_grid_points_that_differ_in_shape_never_fuse_but_loss_weights_do(tmp_path):
    raw = raw_spec(fuse=8)
    del raw["final"], raw["search"], raw["rows"][3]["search"]
    raw["grid"] = {"method.depth": [2, 3], "method.lambda_le": [0.5, 1.0]}
    raw["rows"] = [r for r in raw["rows"] if r["name"] == "HISF"]
    spec = parse_spec(raw)
    trials = expand_sweep(spec, tmp_path)
    groups, alone = plan_groups(trials, spec, three_classes)
    assert len(trials) == 2 * 2 * len(spec.final.seeds if spec.final else [1])
    for g in groups:
        assert len({t.config.method.depth for t in g.members}) == 1  # depth changes the prompt shapes
    # lambda_le 0.5 and 1.0 are both non-zero: those trials fuse; a zero weight changes the graph and would not.
    assert {len({t.config.method.lambda_le for t in g.members}) for g in groups if len(g.members) > 1} == {2}
    zero = [t for t in trials if t.config.method.lambda_le == 0.5][0]
    zero_cfg = replace_path(zero.config, "method.lambda_le", 0.0)
    assert fusion_key(zero_cfg) != fusion_key(zero.config)


def test_released_hicropl_runs_alone_and_says_why(tmp_path):
    raw = raw_spec(fuse=8)
    hicropl = next(r for r in raw["rows"] if r["method"]["name"] == "hicropl")
    hicropl["method"]["mapping"] = "released"
    spec = parse_spec(raw)
    trials = final_trials(spec, tmp_path)
    groups, alone = plan_groups(trials, spec, three_classes)
    released = [t for t in trials if t.config.method.name == "hicropl"]
    assert released and all(alone[t.trial_id].startswith("HiCroPL `mapping: released` runs unfused")
                            for t in released)
    assert all(len(g.members) == 1 for g in groups if g.members[0].config.method.name == "hicropl")
    assert any(len(g.members) == 3 for g in groups)  # the other rows still fuse


def test_fuse_auto_on_a_cpu_bounds_the_sequences_of_a_fused_step(tmp_path):
    spec = parse_spec(raw_spec(fuse="auto", gpus_per_trial=0))
    cfg = final_trials(spec, tmp_path)[0].config
    b = cfg.train.batch_size
    assert group_size(spec, cfg, 3) == min(CPU_AUTO, CPU_SEQUENCES // (b + 3))
    assert group_size(spec, cfg, CPU_SEQUENCES) == 1  # one member's step already holds the bound
    assert group_size(spec, cfg, 1) == CPU_AUTO


def test_fuse_auto_on_a_gpu_is_the_largest_group_the_estimate_fits(tmp_path):
    raw = raw_spec(fuse="auto", gpus_per_trial=1)
    raw["base"]["backbone"] = {"name": "ViT-B-16", "pretrained": None, "precision": "fp16"}
    raw["base"]["train"]["precision"] = "fp16"
    raw["base"]["device"] = "cuda"
    spec = parse_spec(raw)
    cfg = next(t.config for t in final_trials(spec, tmp_path) if t.row == "MaPLe")
    peaks = [estimate_peak_bytes(cfg, k, 100) for k in range(1, MAX_AUTO + 2)]
    per_member = peaks[1] - peaks[0]
    assert per_member > 0 and all(b - a == per_member for a, b in zip(peaks, peaks[1:]))  # linear in members
    # The frozen backbone is held once: ViT-B/16 CLIP's ~150M parameters in fp16, ~0.28 GiB.
    assert 0.25 * GIB < peaks[0] - per_member < 0.35 * GIB

    def sized(gib):
        s = parse_spec({**raw, "resources": {**raw["resources"], "gpu_memory_gib": gib}})
        return group_size(s, cfg, 100)

    for gib in (1.0, 4.0, 80.0):
        k = sized(gib)
        budget = MEMORY_SHARE * gib * GIB
        if peaks[0] > budget:
            assert k == 1  # nothing fits: the trial runs alone (it may still not fit; the estimate is a plan)
        else:
            assert peaks[k - 1] <= budget and (k == MAX_AUTO or peaks[k] > budget)
    assert sized(1.0) <= sized(4.0) <= sized(80.0) == MAX_AUTO


@pytest.mark.parametrize("bad", [0, -2, "big", 1.5, True])
def test_a_bad_fuse_is_refused_by_name(bad):
    with pytest.raises(SpecError, match="resources.fuse"):
        parse_spec(raw_spec(fuse=bad))


def test_dry_run_prints_groups_and_estimates_fused_below_alone(tmp_path):
    raw = raw_spec(fuse="auto")
    raw["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "info.json").write_text(json.dumps({"classnames": ["a", "b", "c"]}))
    spec = parse_spec(raw)
    out = io.StringIO()
    opts = Options(workdir=str(tmp_path), out=out).resolved()
    opts.out = out
    assert print_dry_run("run", spec, opts) == 0
    text = out.getvalue()
    group_lines = [line for line in text.splitlines() if line.startswith("group   ")]
    assert group_lines and all("3 members" in line and "est. peak" in line for line in group_lines)
    assert "asks 4 trial(s) at a time, trained as one fused group" in text
    assert "fused as planned" in text

    trials = final_trials(spec, tmp_path)
    groups, _ = plan_groups(trials, spec, three_classes)
    fused = estimate_hours(spec, trials, n_search=1, groups=groups)
    alone = estimate_hours(spec, trials, n_search=1)
    assert 0 < fused["trial_hours"] < alone["trial_hours"]
    # One fused step of K members costs what one step of K·B images does: never more than K steps alone.
    assert fused["trial_hours"] * len(trials) >= alone["trial_hours"]


def test_a_fixed_fuse_that_would_not_fit_the_gpu_is_split_not_failed(tmp_path):
    raw = raw_spec(fuse=16, gpus_per_trial=1, gpu_memory_gib=4.0)
    raw["base"]["backbone"] = {"name": "ViT-B-16", "pretrained": None, "precision": "fp16"}
    raw["base"]["train"]["precision"] = "fp16"
    raw["base"]["device"] = "cuda"
    raw["final"]["seeds"] = list(range(1, 9))
    raw["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "info.json").write_text(json.dumps({"classnames": [f"c{i}" for i in range(100)]}))
    spec = parse_spec(raw)
    trials = [t for t in final_trials(spec, tmp_path) if t.row == "MaPLe"]
    cfg = trials[0].config
    k = group_size(spec, cfg, 50)
    assert 1 < k < 8  # 16 asked, fewer fit in 0.8 x 4 GiB
    assert estimate_peak_bytes(cfg, k, 50) <= MEMORY_SHARE * 4.0 * GIB < estimate_peak_bytes(cfg, k + 1, 50)
    groups, _ = plan_groups(trials, spec, lambda key: 100)
    assert sorted(t.trial_id for g in groups for t in g.members) == sorted(t.trial_id for t in trials)
    assert all(len(g.members) <= k for g in groups) and len(groups) == -(-8 // k)

    out = io.StringIO()
    opts = Options(workdir=str(tmp_path), out=out).resolved()
    opts.out = out
    assert print_dry_run("final", spec, opts) == 0
    text = out.getvalue()
    assert re.search(rf"^split   final-maple-demo-s1 and its kind: 16 members would need est\. [\d.]+ GiB of the 3\.2 "
                     rf"GiB share .*; groups of at most {k}$", text, re.M), text[-3000:]
