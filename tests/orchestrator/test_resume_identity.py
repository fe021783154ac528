"""`--resume` reuses a recorded trial only when it is provably the same trial (issue 15, item 1): same config
(searched values included), spec hash, data build and code; otherwise it reruns in a fresh folder and a new
MLflow run, the old run is marked stale, and the reason names the part that differs. Real SQLite MLflow store,
real demo shards, no Ray."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.context import Options, RunContext, stage_context
from orchestrator.identity import TAG, code_fingerprint, trial_identity
from orchestrator.resume import STALE_TAG, LaunchRuns, plan_stage
from orchestrator.spec import load_spec
from orchestrator.tracking import Tracker
from orchestrator.trial_callback import open_trial_run
from orchestrator.trials import expand_final
from tests.orchestrator.helpers import write_spec

ROWS = [{"name": "CoOp", "method": {"name": "coop"}}, {"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}]
SEARCH = {"n_trials": 2, "seed": 1, "pruner": "none", "params": {"method.lambda_le": {"low": 0.0, "high": 2.0}}}


@pytest.fixture()
def launch(tmp_path, demo_root, empty_store):
    """A final launch whose two trials (CoOp; HISF with λ_le = 0.5) finished, recorded as a trial records them."""
    spec = load_spec(write_spec(tmp_path / "s.yaml", demo_root, name="ident", rows=ROWS, search=SEARCH))
    opts = Options(workdir=str(tmp_path / "wd")).resolved()
    (tmp_path / "wd").mkdir()
    shutil.copyfile(empty_store, tmp_path / "wd" / "mlflow.db")
    tracker = Tracker(opts.tracking_uri, spec.name)
    parent = tracker.stage_run("final", spec.hash, resume=False)
    ctx = stage_context(spec, opts, tracker.experiment_id, parent)
    trials = _trials(spec, opts, 0.5)
    for t in trials:
        run = open_trial_run(t, ctx)
        run.log_metrics({"hm": 50.0}, step=0)
        run.finish("finished")
        Path(t.config.output_dir).mkdir(parents=True)
        (Path(t.config.output_dir) / "prompts.pt").write_text("trained")
    return spec, opts, tracker, parent, ctx, trials


def _trials(spec, opts, lam):
    return expand_final(spec, opts.workdir, {("HISF", "demo", ()): {"method.lambda_le": lam}})


def test_the_same_trials_are_reused(launch):
    spec, opts, tracker, parent, ctx, trials = launch
    plan = plan_stage(_trials(spec, opts, 0.5), tracker, parent, ctx, resume=True)
    assert [d.kind for d in plan.decisions] == ["reuse", "reuse"] and plan.todo == [] and plan.why_rerun() == ""
    assert all((Path(t.config.output_dir) / "prompts.pt").is_file() for t in trials)


def test_other_searched_values_rerun_in_a_fresh_folder_and_a_new_run(launch):
    spec, opts, tracker, parent, ctx, trials = launch
    now = _trials(spec, opts, 1.5)
    plan = plan_stage(now, tracker, parent, ctx, resume=True)
    kinds = {d.trial.row: d for d in plan.decisions}
    assert kinds["CoOp"].kind == "reuse" and kinds["HISF"].kind == "rerun"
    assert kinds["HISF"].reasons == (("config", "method.lambda_le 0.5 there, 1.5 now"),)
    assert [t.trial_id for t in plan.todo] == ["final-hisf-demo-s1"]
    assert plan.why_rerun() == ("1 recorded trial(s) rerun as not the same trial now: "
                                "config differs for 1 (method.lambda_le 0.5 there, 1.5 now)")
    hisf = next(t for t in now if t.row == "HISF")
    assert not Path(hisf.config.output_dir).exists()  # fresh folder: no old checkpoint to resume
    coop = next(t for t in now if t.row == "CoOp")
    assert (Path(coop.config.output_dir) / "prompts.pt").is_file()
    old = kinds["HISF"].stale[0]
    assert "config: method.lambda_le 0.5 there, 1.5 now" in tracker.client.get_run(old.info.run_id).data.tags[STALE_TAG]
    # The rerun's trial gets its own run in the launch; the stale one is no longer a candidate.
    new = open_trial_run(hisf, ctx)
    assert new.run_id != old.info.run_id and not new.resumed
    again = LaunchRuns.read(tracker, parent, ctx)
    assert [r.info.run_id for r in again.by_trial["final-hisf-demo-s1"]] == [new.run_id]
    assert again.decide(hisf).kind == "continue"  # running, same identity: resumed in its folder


@pytest.mark.parametrize("change, part, detail", [
    ({"spec_hash": "0123456789ab"}, "spec", "hash {was} there, 0123456789ab now"),
    ({"code_fingerprint": "f" * 16}, "code", "fingerprint {was} there, ffffffffffffffff now"),
    ({"data_fingerprints": (("demo", "e" * 16),)}, "data", "demo:{was} there, demo:eeeeeeeeeeeeeeee now"),
])
def test_another_spec_code_or_data_build_reruns_every_trial(launch, change, part, detail):
    spec, opts, tracker, parent, ctx, trials = launch
    was = {"spec": ctx.spec_hash, "code": ctx.code_fingerprint, "data": ctx.data_fingerprint("demo")}[part]
    plan = plan_stage(trials, tracker, parent, dataclasses.replace(ctx, **change), resume=True)
    assert [d.kind for d in plan.decisions] == ["rerun", "rerun"]
    assert all(d.reasons == ((part, detail.format(was=was)),) for d in plan.decisions)
    assert not any(Path(t.config.output_dir).exists() for t in trials)


def test_identity_parts_are_recorded_on_each_run(launch, demo_root):
    spec, opts, tracker, parent, ctx, trials = launch
    from data_shards import open_dataset

    assert ctx.code_fingerprint == code_fingerprint() and len(ctx.code_fingerprint) == 16
    assert ctx.data_fingerprints == (("demo", open_dataset(demo_root / "demo").fingerprint),)
    for t in trials:
        (run,) = MlflowClient(ctx.tracking_uri).search_runs(
            [tracker.experiment_id], f"tags.`hisf.trial_id` = '{t.trial_id}'")
        tags = run.data.tags
        ident = trial_identity(t.config, ctx)
        assert tags[TAG] == ident.digest and len(ident.digest) == 16
        assert tags["hisf.identity.config"] == ident.config and tags["hisf.spec_hash"] == spec.hash
        assert tags["hisf.data_fingerprint"] == f"demo:{ctx.data_fingerprint('demo')}"
        assert tags["hisf.code_fingerprint"] == ctx.code_fingerprint and tags["hisf.git_commit"]
    # Runtime-only keys (output folder, device, loader workers, weights cache) are not the trial's identity.
    t = trials[0]
    moved = dataclasses.replace(t.config, output_dir="/elsewhere", device="cuda:0",
                                data=dataclasses.replace(t.config.data, num_workers=3))
    assert trial_identity(moved, ctx) == trial_identity(t.config, ctx)
    assert trial_identity(dataclasses.replace(t.config, seed=9), ctx) != trial_identity(t.config, ctx)


def test_a_run_without_an_identity_is_not_trusted(launch):
    spec, opts, tracker, parent, ctx, trials = launch
    client = tracker.client
    for r in tracker.children(parent):
        client.delete_tag(r.info.run_id, TAG)  # as an older hisf-bench recorded it
    plan = plan_stage(trials, tracker, parent, ctx, resume=True)
    assert [d.kind for d in plan.decisions] == ["rerun", "rerun"]
    assert plan.decisions[0].reasons[0][0] == "recorded"


def test_a_fresh_stage_clears_every_trial_folder(launch):
    spec, opts, tracker, parent, ctx, trials = launch
    plan = plan_stage(trials, tracker, parent, ctx, resume=False)
    assert [d.kind for d in plan.decisions] == ["new", "new"]
    assert not any(Path(t.config.output_dir).exists() for t in trials)


def test_run_context_round_trips_and_refuses_unknown_keys(launch):
    ctx = launch[4]
    assert RunContext.from_dict(ctx.to_dict()) == ctx
    with pytest.raises(ValueError, match="unknown keys"):
        RunContext.from_dict({**ctx.to_dict(), "gpus": 1})


def test_status_and_dry_run_say_what_resume_would_do(launch):
    # A later search found λ_le = 1.5 (a real study in the Optuna store, named as the search stage names it).
    import io

    import optuna

    from orchestrator.status import print_dry_run, print_status
    from orchestrator.trials import search_groups

    spec, opts, tracker, parent, ctx, trials = launch
    search = tracker.stage_run("search", spec.hash, resume=False, extra_tags={"hisf.study_tag": "later"})
    (group,) = search_groups(spec, "later")
    study = optuna.create_study(study_name=group.study, storage=opts.optuna_storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"method.lambda_le": 1.5}, value=60.0, distributions={
        "method.lambda_le": optuna.distributions.FloatDistribution(0.0, 2.0)}))
    out = io.StringIO()
    opts = dataclasses.replace(opts, out=out)
    assert print_status(spec, opts) == 0
    said = ("--resume would reuse 1 of 2 trials (finished as the same trial) and run 1 (0 continued, 0 new, 1 rerun); "
            "1 recorded trial(s) rerun as not the same trial now: config differs for 1 (method.lambda_le 0.5 there, "
            "1.5 now)")
    assert f"  resume: {said}" in out.getvalue()
    assert print_dry_run("final", spec, opts) == 0
    assert f"resume  final: latest launch {parent}: {said}" in out.getvalue()
    # Nothing was changed by looking: the folders and runs are as they were.
    assert all((Path(t.config.output_dir) / "prompts.pt").is_file() for t in trials)
    assert not any(STALE_TAG in r.data.tags for r in tracker.children(parent))
    assert f"search run {search}" in out.getvalue()


def test_a_trial_without_a_run_in_the_launch_starts_in_a_fresh_folder(launch):
    # Whatever is in its folder is not its own: a trial's run exists before it writes a checkpoint.
    spec, opts, tracker, parent, ctx, trials = launch
    coop = next(t for t in trials if t.row == "CoOp")
    (run,) = [r for r in tracker.children(parent) if r.data.tags["hisf.trial_id"] == coop.trial_id]
    tracker.client.delete_run(run.info.run_id)
    plan = plan_stage(trials, tracker, parent, ctx, resume=True)
    assert {d.trial.row: d.kind for d in plan.decisions} == {"CoOp": "new", "HISF": "reuse"}
    assert not Path(coop.config.output_dir).exists()
    assert all((Path(t.config.output_dir) / "prompts.pt").is_file() for t in trials if t.row == "HISF")
