"""Optuna plumbing on real SQLite storage: the searcher asks/tells studies, resumes orphans, reads best values."""

from pathlib import Path

import optuna
import pytest
from ray.tune.search import Searcher

from orchestrator.context import default_optuna_storage as default_storage
from orchestrator.results import group_result
from orchestrator.search import StudySearcher, best_values, open_trial
from orchestrator.spec import SpecError, parse_spec
from orchestrator.trials import search_groups
from tests.orchestrator.helpers import demo_raw


def spec(n_trials=3, datasets=("demo",), fuse=1):
    raw = demo_raw()
    raw["search"]["n_trials"] = n_trials
    raw["data"]["datasets"] = list(datasets)
    raw["resources"]["fuse"] = fuse
    return parse_spec(raw)


def one(config):
    """The payload of the one member of a suggested group (`resources.fuse: 1`)."""
    (member,) = config["group"]["members"]
    return member


def told(config, **record):
    """The final result of the Tune trial that ran `config`'s group: every member with `record`."""
    return group_result({m["trial_id"]: dict(record) for m in config["group"]["members"]})


def test_searcher_asks_until_n_trials_and_tells_results(tmp_path):
    s = spec(n_trials=3, datasets=("demo", "demo2"))
    url = default_storage(tmp_path)
    groups = search_groups(s, "tagA")
    searcher = StudySearcher(s, groups, url, str(tmp_path), ctx={"k": 1})
    configs = []
    while True:
        c = searcher.suggest(f"tune{len(configs)}")
        if c == Searcher.FINISHED:
            break
        configs.append(c)
    assert len(configs) == 6  # 3 per study, 2 studies
    assert {one(c)["study"] for c in configs} == {g.study for g in groups}
    for c in configs:
        lam = one(c)["config"]["method"]["lambda_le"]
        assert 0.0 <= lam <= 2.0 and c["ctx"] == {"k": 1}
    # tell: one value each, one pruned, one failed
    for i, c in enumerate(configs):
        if i == 4:
            searcher.on_trial_complete(f"tune{i}", told(c, val_acc=10.0, hisf_status="pruned"))
        elif i == 5:
            searcher.on_trial_complete(f"tune{i}", None, error=True)
        else:
            searcher.on_trial_complete(f"tune{i}", told(c, val_acc=10.0 * (i + 1), hisf_status="finished"))
    storage = optuna.storages.RDBStorage(url)
    states = {}
    for g in groups:
        st = optuna.load_study(study_name=g.study, storage=storage)
        states[g.dataset] = sorted(t.state.name for t in st.trials)
        assert st.metric_names == ["val_acc"]  # the dashboard names the objective
        # A trial told as failed keeps why (an error with no final result: Ray's, see its run).
        for t in st.trials:
            if t.state.name == "FAIL":
                assert t.user_attrs["fail_reason"] == "the trial ended without a final result (see its MLflow run)"
    assert sum(len(v) for v in states.values()) == 6
    assert sorted(sum(states.values(), [])).count("COMPLETE") == 4
    best = best_values(url, groups)
    # the best trial of each study is the one told the highest value; its params are what final runs
    for g in groups:
        st = optuna.load_study(study_name=g.study, storage=storage)
        top = max((t for t in st.trials if t.value is not None), key=lambda t: t.value)
        assert best[(g.row, g.dataset, g.point)] == top.params
        assert set(top.params) == {"method.lambda_le", "method.lambda_sa"}


def test_a_fused_search_asks_a_group_of_trials_at_once_and_tells_each(tmp_path):
    """`resources.fuse: 3`, 5 trials per study: groups of 3 then 2 asks of one study (TPE with constant_liar keeps
    parallel asks apart), each member told its own value, a group that errored failing each of its members."""
    s = spec(n_trials=5, datasets=("demo", "demo2"), fuse=3)
    url = default_storage(tmp_path)
    groups = search_groups(s, "tagG")
    searcher = StudySearcher(s, groups, url, str(tmp_path), ctx={})
    suggested = []
    while (c := searcher.suggest(f"tune{len(suggested)}")) != Searcher.FINISHED:
        suggested.append(c)
    sizes = [len(c["group"]["members"]) for c in suggested]
    assert sorted(sizes) == [2, 2, 3, 3]
    for c in suggested:
        assert len({m["study"] for m in c["group"]["members"]}) == 1  # a group never mixes studies
        lams = [m["config"]["method"]["lambda_le"] for m in c["group"]["members"]]
        assert len(set(lams)) == len(lams)  # distinct points
    for i, c in enumerate(suggested):
        if i == 0:
            searcher.on_trial_complete("tune0", None, error=True)
        else:
            searcher.on_trial_complete(f"tune{i}", group_result(
                {m["trial_id"]: {"hisf_status": "finished", "val_acc": float(m["optuna_number"])}
                 for m in c["group"]["members"]}))
    storage = optuna.storages.RDBStorage(url)
    states = [t.state.name for g in groups for t in optuna.load_study(study_name=g.study, storage=storage).trials]
    assert states.count("FAIL") == sizes[0] and states.count("COMPLETE") == 10 - sizes[0]
    for g in groups:
        for t in optuna.load_study(study_name=g.study, storage=storage).trials:
            assert t.state.name == "FAIL" or t.value == float(t.number)  # each member's own value


def test_resume_reissues_orphaned_running_trials(tmp_path):
    s = spec(n_trials=3)
    url = default_storage(tmp_path)
    groups = search_groups(s, "tagB")
    first = StudySearcher(s, groups, url, str(tmp_path), ctx={})
    a, b = first.suggest("t0"), first.suggest("t1")
    first.on_trial_complete("t0", told(a, val_acc=50.0, hisf_status="finished"))
    # the driver dies here: trial b stays RUNNING in the study
    again = StudySearcher(s, groups, url, str(tmp_path), ctx={})
    assert [t.trial_id for t in again.pending] == [one(b)["trial_id"]]
    c = again.suggest("r0")
    assert one(c)["trial_id"] == one(b)["trial_id"]
    assert one(c)["config"] == one(b)["config"]  # same values, same output folder (checkpoint resumes)
    assert one(c)["optuna_number"] == 1
    d = again.suggest("r1")
    assert one(d)["optuna_number"] == 2
    assert again.suggest("r2") == Searcher.FINISHED  # 3 trials in all, the finished one not rerun


def _recorded_launch(tmp_path, s, payload, ctx_change=None):
    """A real MLflow launch holding the finished run of the trial `payload`, recorded under the stage context
    (changed by `ctx_change`, e.g. another code version); returns (tracker, parent, the context now, run id)."""
    import dataclasses

    from orchestrator.context import Options, stage_context
    from orchestrator.tracking import Tracker
    from orchestrator.trial_callback import open_trial_run
    from orchestrator.trials import Trial

    opts = Options(workdir=str(tmp_path)).resolved()
    tracker = Tracker(opts.tracking_uri, s.name)
    parent = tracker.stage_run("search", s.hash, resume=False)
    ctx = stage_context(s, opts, tracker.experiment_id, parent)
    run = open_trial_run(Trial.from_payload(payload), dataclasses.replace(ctx, **(ctx_change or {})))
    run.log_metrics({"val_acc": 77.0}, step=0)
    run.finish("finished")
    return tracker, parent, ctx, run.run_id


def test_resume_tells_trials_whose_run_finished(tmp_path):
    from orchestrator.resume import LaunchRuns

    s = spec(n_trials=2)
    url = default_storage(tmp_path)
    groups = search_groups(s, "tagC")
    first = StudySearcher(s, groups, url, str(tmp_path), ctx={})
    a = first.suggest("t0")
    tracker, parent, ctx, _ = _recorded_launch(tmp_path, s, one(a))
    again = StudySearcher(s, groups, url, str(tmp_path), ctx={}, runs=LaunchRuns.read(tracker, parent, ctx))
    assert again.pending == [] and again.told_from_record == 1
    st = optuna.load_study(study_name=groups[0].study, storage=optuna.storages.RDBStorage(url))
    assert st.trials[0].value == 77.0


def test_resume_reruns_an_orphan_whose_run_is_another_trial(tmp_path):
    # Its run finished, but under another code version: not the same trial, so it is issued again in a fresh
    # folder (its old checkpoint gone), and the old run is marked stale.
    from orchestrator.resume import STALE_TAG, LaunchRuns

    s = spec(n_trials=2)
    url = default_storage(tmp_path)
    groups = search_groups(s, "tagF")
    first = StudySearcher(s, groups, url, str(tmp_path), ctx={})
    a = first.suggest("t0")
    folder = Path(one(a)["config"]["output_dir"])
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "state.pt").write_bytes(b"old code's epoch")
    tracker, parent, ctx, old = _recorded_launch(tmp_path, s, one(a), {"code_fingerprint": "0" * 16})
    again = StudySearcher(s, groups, url, str(tmp_path), ctx={}, runs=LaunchRuns.read(tracker, parent, ctx))
    assert [t.trial_id for t in again.pending] == [one(a)["trial_id"]] and again.told_from_record == 0
    (decision,) = again.rerun
    assert [p for p, _ in decision.reasons] == ["code"]
    assert not folder.exists()
    assert "code: fingerprint 0000000000000000 there" in tracker.client.get_run(old).data.tags[STALE_TAG]
    st = optuna.load_study(study_name=groups[0].study, storage=optuna.storages.RDBStorage(url))
    assert st.trials[0].state.name == "RUNNING"  # not told the other trial's value


def test_worker_side_pruning_against_the_median(tmp_path):
    s = spec(n_trials=10)
    url = default_storage(tmp_path)
    (g,) = search_groups(s, "tagD")
    searcher = StudySearcher(s, [g], url, str(tmp_path), ctx={})
    # a previous completed trial with a good curve; startup_trials=2 in the demo spec, so two are needed
    for i in range(2):
        c = searcher.suggest(f"g{i}")
        t = open_trial(url, g.study, one(c)["optuna_trial_id"], "median", s.search.startup_trials)
        for epoch in range(2):
            t.report(80.0 + epoch, epoch)
        searcher.on_trial_complete(f"g{i}", told(c, val_acc=81.0, hisf_status="finished"))
    c = searcher.suggest("bad")
    t = open_trial(url, g.study, one(c)["optuna_trial_id"], "median", s.search.startup_trials)
    t.report(20.0, 0)
    assert t.should_prune()
    c2 = searcher.suggest("good")
    t2 = open_trial(url, g.study, one(c2)["optuna_trial_id"], "median", s.search.startup_trials)
    t2.report(95.0, 0)
    assert not t2.should_prune()


def test_best_values_needs_a_completed_trial(tmp_path):
    s = spec()
    url = default_storage(tmp_path)
    groups = search_groups(s, "none")
    with pytest.raises(SpecError, match="not found"):
        best_values(url, groups)


def test_a_new_trial_clears_a_stale_folder_but_an_orphan_keeps_its_checkpoint(tmp_path):
    s = spec(n_trials=2)
    url = default_storage(tmp_path)
    (g,) = search_groups(s, "tagE")
    stale = tmp_path / "runs" / "demo" / "search-hisf-demo-t0" / "checkpoint"
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"old search")
    first = StudySearcher(s, [g], url, str(tmp_path), ctx={})
    a = first.suggest("t0")
    assert one(a)["config"]["output_dir"] == str(stale.parent)
    assert not stale.exists()
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"this trial's own epoch")
    again = StudySearcher(s, [g], url, str(tmp_path), ctx={})
    assert one(again.suggest("r0"))["trial_id"] == "search-hisf-demo-t0"
    assert (stale / "state.pt").read_bytes() == b"this trial's own epoch"
