"""Running a stage (sweep, search, final) end to end: data and pre-flight, the stage's MLflow parent run,
which trials run (orchestrator/resume.py), the Tuner (orchestrator/scheduling.py) and the stage's outcome."""

from __future__ import annotations

import contextlib
import time

from orchestrator.context import Options, redact, stage_context
from orchestrator.resume import LaunchRuns, plan_stage
from orchestrator.scheduling import collect, fit, ray_session, tuner
from orchestrator.spec import ExperimentSpec, SpecError
from orchestrator.stage_end import StageResult, closing_stage, count_statuses
from orchestrator.stage_end import finish_stage as _finish
from orchestrator.tracking import open_tracker
from orchestrator.trials import Trial, expand_final, expand_sweep, search_groups


def prepare_data(spec: ExperimentSpec, out, opts: Options | None = None, needs_test: bool = True) -> None:
    """`data.demo: true`: build the demo dataset(s) under data.root unless already there; then the pre-flight
    checks on the driver (orchestrator.preflight): every dataset built and named as the spec names it, K shots
    per class, backbone weights resolved (a pretrained tag fetched once into the cache), and on a cluster
    (`--address`) stores and folders that every node sees. All before an MLflow run or a trial exists."""
    from orchestrator import preflight
    from orchestrator.demo_data import build_demo
    from orchestrator.spec import check_descriptions

    if spec.data.demo:
        build_demo(spec, out)
    preflight.check(spec, needs_test=needs_test, out=out)
    # Every dataset is built now, so HiCroPL's descriptions are checked against each one's class names.
    check_descriptions(spec)
    if opts is not None and opts.address:
        # Connected here, before the stage's MLflow parent run; the stage's ray_session reuses the connection.
        with ray_session(spec, opts):
            preflight.check_cluster(spec, opts, preflight.alive_nodes(), out)


def run_trials(stage: str, spec: ExperimentSpec, trials: list[Trial], opts: Options,
               search_run_id: str = "") -> StageResult:
    """Sweep or final stage: a fixed list of trials; on `--resume` the same trials finished are reused."""
    started = time.perf_counter()
    prepare_data(spec, opts.out, opts)
    tracker = open_tracker(spec, opts)
    parent = tracker.stage_run(stage, spec.hash, opts.resume)
    with closing_stage(stage, tracker, parent, started) as info:
        info.total = len(trials)
        ctx = stage_context(spec, opts, tracker.experiment_id, parent, search_run_id)
        plan = plan_stage(trials, tracker, parent, ctx, opts.resume)
        reused, todo = plan.reused, plan.todo
        groups = stage_groups(spec, todo)
        fused = f" in {len(groups)} fused group(s)" if len(groups) < len(todo) else ""
        print(f"[{stage}] {len(trials)} trials, {len(reused)} already finished, running {len(todo)}{fused} "
              f"(MLflow parent run {parent})", file=opts.out)
        if plan.rerun:
            print(f"[{stage}] {plan.why_rerun()}", file=opts.out)
        results: dict[str, dict] = {}
        if todo:
            from ray import tune

            from orchestrator.progress import StageProgress

            with _stage_console(spec, stage, opts) as console, ray_session(spec, opts):
                progress = StageProgress(stage, len(trials), console, prior=count_statuses(reused.values()),
                                         every=opts.progress_every, live=False if opts.verbose else None)
                try:
                    grid = fit(tuner(spec, opts, f"{spec.name}-{stage}-{parent[:8]}", progress,
                                     param_space={"group": tune.grid_search([g.payload() for g in groups]),
                                                  "ctx": ctx.to_dict()}))
                finally:
                    progress.close()
                results = collect(grid)
        return _finish(stage, tracker, parent, len(trials), reused, results, started)


def stage_groups(spec: ExperimentSpec, trials: list[Trial]):
    """The trials that run now, in fused groups (orchestrator/groups.py; `resources.fuse`)."""
    from orchestrator.groups import plan_groups
    from orchestrator.trials import class_count

    return plan_groups(trials, spec, lambda key: class_count(spec.data.root, key))[0]


def run_search(spec: ExperimentSpec, opts: Options) -> StageResult:
    from orchestrator.progress import StageProgress
    from orchestrator.search import StudySearcher, best_values

    started = time.perf_counter()
    prepare_data(spec, opts.out, opts, needs_test=False)
    tracker = open_tracker(spec, opts)
    parent = tracker.stage_run("search", spec.hash, opts.resume)
    with closing_stage("search", tracker, parent, started) as info:
        parent_tags = tracker.client.get_run(parent).data.tags
        if opts.resume and parent_tags.get("hisf.spec_hash") not in (None, spec.hash):
            print(f"[search] note: the spec changed since this search started (hash {parent_tags['hisf.spec_hash']} "
                  f"there, {spec.hash} now); its studies keep the trials they already hold", file=opts.out)
        tag = parent_tags.get("hisf.study_tag") or parent[:8]
        groups = search_groups(spec, tag)
        info.total = len(groups) * spec.search.n_trials
        tracker.set_tags(parent, {"hisf.study_tag": tag, "optuna.storage": redact(opts.optuna_storage),
                                  "optuna.studies": ",".join(g.study for g in groups)})
        ctx = stage_context(spec, opts, tracker.experiment_id, parent)
        runs = LaunchRuns.read(tracker, parent, ctx) if opts.resume else None
        done_runs = {r.data.tags["hisf.trial_id"]: r for r in (runs.done() if runs else [])}
        searcher = StudySearcher(spec, groups, opts.optuna_storage, opts.workdir, ctx.to_dict(), runs=runs)
        todo = sum(max(0, spec.search.n_trials - searcher.asked[g.study]) for g in groups) + len(searcher.pending)
        print(f"[search] {len(groups)} stud{'y' if len(groups) == 1 else 'ies'} × {spec.search.n_trials} trials "
              f"({spec.search.sampler}, pruner {spec.search.pruner}), running {todo} (MLflow parent run {parent})",
              file=opts.out)
        if searcher.rerun:
            from orchestrator.resume import ResumePlan

            print(f"[search] {ResumePlan(searcher.rerun).why_rerun()}", file=opts.out)
        results: dict[str, dict] = {}
        if todo:
            total = len(groups) * spec.search.n_trials
            prior = count_statuses(done_runs.values())
            # Asked before but with no finished run: trials that failed (a failed trial is not asked again).
            prior["failed"] = prior.get("failed", 0) + max(0, total - todo - sum(prior.values()))
            metric = spec.search.metric
            done = [r.data.metrics[metric] for r in done_runs.values()
                    if r.data.tags.get("hisf.status") == "finished" and metric in r.data.metrics]
            with _stage_console(spec, "search", opts) as console, ray_session(spec, opts):
                progress = StageProgress("search", total, console, prior=prior, metric=metric,
                                         best=max(done) if done else None, every=opts.progress_every,
                                         live=False if opts.verbose else None)
                try:
                    grid = fit(tuner(spec, opts, f"{spec.name}-search-{parent[:8]}-{int(time.time())}", progress,
                                     searcher=searcher))
                finally:
                    progress.close()
                results = collect(grid)
        try:
            best = best_values(opts.optuna_storage, groups)
            tracker.set_tags(parent, {f"hisf.best.{g.row}.{g.dataset}": _fmt(best[(g.row, g.dataset, g.point)]) for g in groups})
        except Exception as e:  # a study with no completed trial: reported, the stage is marked failed below
            print(f"[search] {e}", file=opts.out)
        return _finish("search", tracker, parent, len(done_runs) + len(results), done_runs, results, started)


def run_final(spec: ExperimentSpec, opts: Options) -> StageResult:
    from orchestrator.search import best_values

    best, search_run_id = {}, ""
    if spec.searched_rows:
        run = open_tracker(spec, opts).latest_stage_run("search")
        if run is None:
            raise SpecError(f"{spec.path}: final: no search stage found in {opts.tracking_uri}; "
                            f"run `hisf-bench search {spec.path}` first")
        search_run_id = run.info.run_id
        best = best_values(opts.optuna_storage, search_groups(spec, run.data.tags["hisf.study_tag"]))
        for (row, dataset, _), values in best.items():
            print(f"[final] {row} on {dataset}: best {_fmt(values)}", file=opts.out)
    return run_trials("final", spec, expand_final(spec, opts.workdir, best), opts, search_run_id)


def run_sweep(spec: ExperimentSpec, opts: Options) -> StageResult:
    return run_trials("sweep", spec, expand_sweep(spec, opts.workdir), opts)


@contextlib.contextmanager
def _stage_console(spec: ExperimentSpec, stage: str, opts: Options):
    """Ray's output to <workdir>/logs/<spec>-<stage>.log (and the console with --verbose); yields the console."""
    from orchestrator.progress import log_path, ray_output_to_log

    log = log_path(opts.workdir, spec.name, stage)
    if not opts.verbose:
        print(f"[{stage}] Ray's output: {log} (--verbose shows it here)", file=opts.out)
    with ray_output_to_log(opts.out, log, opts.verbose) as console:
        yield console


def _fmt(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
