"""The Optuna search stage: studies in RDB storage, a Ray Tune searcher that asks/tells them, pruning, best values.

One study per searched (row, dataset, grid point), named `<spec>:<row>:<dataset>[:k=v]:<tag>` where the
tag is the search stage's MLflow parent run (so a fresh `search` never mixes with an earlier one, and
`--resume` continues the same studies). Only the spec's validation metric is told to a study
(docs/protocols.md: the test split never feeds the search).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import optuna
from ray.tune.search import Searcher

from orchestrator.groups import TrialGroup
from orchestrator.results import ERROR_KEY, STATUS_KEY, member_results
from orchestrator.resume import LaunchRuns, clear_trial_folder, result_record
from orchestrator.spec import ExperimentSpec, ParamRange, SearchSpec, SpecError
from orchestrator.trials import SearchGroup, Trial, search_trial, trials_root

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage(url: str) -> optuna.storages.RDBStorage:
    """The study storage at `url`; its calls ride out a locked SQLite file or a restarting database server
    (orchestrator.optuna_storage.RetryingRDBStorage)."""
    from orchestrator.optuna_storage import open_storage

    return open_storage(url)


def make_sampler(s: SearchSpec) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    # constant_liar: trials running in parallel are assumed bad so TPE does not propose the same point twice.
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials, constant_liar=True)


def make_pruner(name: str, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(startup_trials, 1), n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def distributions(params: tuple[ParamRange, ...]) -> dict[str, optuna.distributions.BaseDistribution]:
    out = {}
    for p in params:
        if p.choices is not None:
            out[p.key] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.int:
            out[p.key] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    return out


def open_study(url: str, name: str, spec: SearchSpec) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage(url), direction="maximize",
                                sampler=make_sampler(spec), pruner=make_pruner(spec.pruner, spec.startup_trials),
                                load_if_exists=True)
    if study.metric_names != [spec.metric]:
        # The objective's name, so the dashboard and reports say `val_acc`, not "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    return study


def open_trial(url: str, study_name: str, optuna_trial_id: int, pruner: str, startup_trials: int) -> optuna.Trial:
    """Worker side: the running Optuna trial, to report validation curves and ask whether to prune."""
    study = optuna.load_study(study_name=study_name, storage=storage(url),
                              pruner=make_pruner(pruner, startup_trials))
    return optuna.trial.Trial(study, optuna_trial_id)


class NoCompletedTrial(SpecError):
    """A study the final stage takes best values from has no completed trial."""


def best_values(url: str, groups: list[SearchGroup]) -> dict[tuple, dict[str, Any]]:
    """(row, dataset, point) -> the best trial's params, for the final stage."""
    out = {}
    for g in groups:
        try:
            study = optuna.load_study(study_name=g.study, storage=storage(url))
        except KeyError:
            raise SpecError(f"search study {g.study!r} not found in {url}; run `hisf-bench search` first") from None
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise NoCompletedTrial(f"search study {g.study!r} has no completed trial (its trials failed or never ran; "
                                   "`hisf-bench status SPEC` lists them)")
        out[(g.row, g.dataset, g.point)] = dict(study.best_trial.params)
    return out


class StudySearcher(Searcher):
    """Ray Tune searcher over several Optuna studies: asks each for its trials, tells it the results.

    Trials a killed driver left RUNNING are issued again first (same number, same values, same output
    folder, so the engine resumes their checkpoint); with `runs` (the launch's recorded runs, on `--resume`)
    one whose run finished as the same trial is told from its record instead, and one whose runs are of
    another identity reruns fresh (orchestrator/resume.py). COMPLETE, PRUNED and FAIL trials count toward
    `n_trials` and are not rerun.
    """

    def __init__(self, spec: ExperimentSpec, groups: list[SearchGroup], url: str, workdir: str, ctx: dict,
                 runs: LaunchRuns | None = None):
        # No metric for Tune itself: a Tune trial reports a fused group's progress, not one trial's val_acc (and a
        # failed trial's final result has none, which Tune's strict metric check would turn into an error that ends
        # the whole stage); each member's value is told to its study here (on_trial_complete), its pruning asked in
        # its own process.
        super().__init__(metric=None, mode=None)
        self.spec, self.groups, self.url, self.workdir, self.ctx = spec, groups, url, workdir, ctx
        self.dists = distributions(spec.search.params)
        self.studies = {g.study: open_study(url, g.study, spec.search) for g in groups}
        self.asked = {g.study: 0 for g in groups}
        self.pending: list[Trial] = []
        self.live: dict[str, list[Trial]] = {}  # Tune trial id -> the members of the group it runs
        self.told_from_record = 0
        self.rerun = []  # resume decisions of orphans that rerun fresh (another identity), for the console
        for g in groups:
            for ft in self.studies[g.study].get_trials(deepcopy=False):
                self.asked[g.study] += 1
                if ft.state == optuna.trial.TrialState.RUNNING:
                    t = search_trial(spec, g, ft.number, ft._trial_id, ft.params, workdir)
                    decision = runs.decide(t) if runs is not None else None
                    if decision is not None and decision.kind == "reuse":
                        # Its run finished but the driver died before telling the study.
                        self._tell_from_record(g.study, ft.number, result_record(decision.run))
                        self.told_from_record += 1
                        continue
                    if decision is not None:
                        runs.settle(decision)  # a rerun (another identity) or a trial without a run: fresh folder
                        if decision.kind == "rerun":
                            self.rerun.append(decision)
                    self.pending.append(t)

    def _tell_from_record(self, study: str, number: int, result: Mapping[str, Any] | None) -> None:
        s = self.studies[study]
        if not result or result.get(STATUS_KEY) == "failed":
            reason = (result or {}).get(ERROR_KEY) or "the trial ended without a final result (see its MLflow run)"
            trial_id = s.get_trials(deepcopy=False)[number]._trial_id
            optuna.trial.Trial(s, trial_id).set_user_attr("fail_reason", str(reason)[:2000])
            s.tell(number, state=optuna.trial.TrialState.FAIL)
        elif result.get(STATUS_KEY) == "pruned":
            s.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            s.tell(number, float(result[self.spec.search.metric]))

    def suggest(self, tune_trial_id: str):
        """The next group: trials a killed driver left RUNNING first, then asks to the study with the fewest, up to
        the group size (`resources.fuse`) and only trials that fuse (a searched value may change shapes)."""
        from hisf.engine.group import fusion_key

        members: list[Trial] = []
        while not members or len(members) < self._size(members[0]):
            t = self._next(members[0].study if members else None)
            if t is None:
                break
            if members and fusion_key(t.config) != fusion_key(members[0].config):
                self.pending.insert(0, t)  # it starts the next group
                break
            members.append(t)
        if not members:
            return Searcher.FINISHED
        self.live[tune_trial_id] = members
        return {"group": TrialGroup(tuple(members)).payload(), "ctx": self.ctx}

    def _next(self, study: str | None) -> Trial | None:
        """A pending trial (of `study` when given), else a new ask of `study` (or of the open study with the fewest
        asks); None when there is none."""
        for i, t in enumerate(self.pending):
            if study is None or t.study == study:
                return self.pending.pop(i)
        open_groups = [g for g in self.groups if self.asked[g.study] < self.spec.search.n_trials
                       and (study is None or g.study == study)]
        if not open_groups:
            return None
        g = min(open_groups, key=lambda g: self.asked[g.study])
        ot = self.studies[g.study].ask(self.dists)
        self.asked[g.study] += 1
        t = search_trial(self.spec, g, ot.number, ot._trial_id, ot.params, self.workdir)
        # A new trial starts clean: an earlier search's folder under the same id holds other values.
        clear_trial_folder(t, trials_root(self.workdir, self.spec))
        return t

    def _size(self, first: Trial) -> int:
        from orchestrator.groups import group_size, train_classes
        from orchestrator.trials import class_count

        cfg = first.config
        return group_size(self.spec, cfg, train_classes(cfg, class_count(self.spec.data.root, cfg.data.dataset)))

    def on_trial_complete(self, tune_trial_id: str, result: dict | None = None, error: bool = False) -> None:
        members = self.live.pop(tune_trial_id, None)
        if not members:
            return
        records = member_results(None if error else result, [t.trial_id for t in members])
        for t in members:
            rec = records[t.trial_id]
            ok = rec[STATUS_KEY] != "failed" and (rec[STATUS_KEY] == "pruned" or self.spec.search.metric in rec)
            self._tell_from_record(t.study, t.optuna_number, rec if ok else {**rec, STATUS_KEY: "failed"})
