"""What the user reads: the dry-run plan, a stage's progress, and where the results are."""

from __future__ import annotations

import shlex
from pathlib import Path

from hisf.model.facts import METHODS
from orchestrator.spec import ExperimentSpec
from orchestrator.estimate import estimate_hours
from orchestrator.trials import expand_final, expand_sweep, search_groups, trial_resources


def plan(command: str, spec: ExperimentSpec, workdir: str) -> tuple[list, list]:
    """(search groups, fixed trials) the command would run; searched rows in `final` show base values."""
    groups, trials = [], []
    has_search = spec.search is not None and bool(spec.searched_rows)
    if command == "search" or (command == "run" and has_search):
        groups = search_groups(spec)
    if command == "sweep" or (command == "run" and not has_search):
        trials = expand_sweep(spec, workdir)
    if command == "final" or (command == "run" and has_search):
        placeholder = {(g.row, g.dataset, g.point): {} for g in search_groups(spec)} if has_search else {}
        trials = expand_final(spec, workdir, placeholder)
    return groups, trials


def settings(cfg) -> str:
    """`n_ctx 16, depth 12, ..., preset hicropl, batch 32`: what a trial's row sets, for the dry run.

    The method keys shown are the method's own (`hisf.model.facts`); None prints as "default" (its own value)."""
    m, t = cfg.method, cfg.train
    facts = METHODS[m.name]
    keys = facts.settings
    if getattr(m, "layers", None) is not None:
        keys = tuple(k for k in keys if k != "depth") + ("layers",)
    values = {k: getattr(m, k, None) for k in keys}
    if values.get("released_storage", "") is None:  # set under `mapping: released` only
        del values["released_storage"]
    parts = [f"{k} {'default' if v is None else v}" for k, v in values.items()]
    if facts.trains:
        parts += [f"preset {t.preset}", f"batch {t.batch_size}"] + ([f"lr {t.lr:g}"] if t.lr is not None else [])
    return ", ".join(parts)


def print_dry_run(command: str, spec: ExperimentSpec, opts) -> int:
    from orchestrator.spec import check_descriptions

    out = opts.out
    # Bad descriptions fail here as in a real run; datasets not built yet are listed, not checked.
    notes = check_descriptions(spec)
    groups, trials = plan(command, spec, opts.workdir)
    res = spec.resources
    per_trial = trial_resources(spec)
    if res.workers_per_trial > 1:
        per_trial = {"workers": res.workers_per_trial, "cpu/worker": res.cpus_per_trial, "gpu/worker": res.gpus_per_trial}
    print(f"spec {spec.name} ({spec.path}, hash {spec.hash}), protocol {spec.protocol}: dry run of `{command}`", file=out)
    print(f"resources per trial {per_trial}, at most {res.max_concurrent_trials} at once, "
          f"max_failures {res.max_failures}", file=out)
    for g in groups:
        ranges = ", ".join(f"{p.key} in {list(p.choices) if p.choices else [p.low, p.high]}{' log' if p.log else ''}"
                           for p in spec.search.params)
        print(f"search  {g.study}: {spec.search.n_trials} trials ({spec.search.sampler}, pruner {spec.search.pruner}, "
              f"seed {spec.search.seed}, maximise {spec.search.metric}) over {ranges}", file=out)
    for t in trials:
        cfg = t.config
        searched = " + searched values" if t.stage == "final" and spec.row(t.row).search else ""
        extra = settings(cfg)
        print(f"{t.stage:6s}  {t.trial_id}: method {cfg.method.name}, dataset {t.dataset}, seed {t.seed}, "
              f"epochs {cfg.train.epochs}{', ' + extra if extra else ''}{searched}"
              f"{''.join(f', {k}={v}' for k, v in t.point)}", file=out)
    fused = _print_groups(spec, trials, groups, out)
    for note in notes:
        print(f"note    {note}", file=out)
    stage = {"sweep": "sweep", "final": "final", "run": "final" if groups else "sweep"}.get(command)
    if stage is not None:
        print(f"resume  {stage}: {dry_run_resume_preview(stage, spec, opts)}", file=out)
    alone = estimate_hours(spec, trials, n_search=1 if groups else 0)
    est = estimate_hours(spec, trials, n_search=1 if groups else 0, groups=fused)
    n = len(trials) + (len(groups) * spec.search.n_trials if groups else 0)
    how = (f"fused as planned; {alone['gpu_hours']:.2f} GPU-hours with every trial alone" if len(fused) < len(trials)
           else "every trial alone")
    print(f"total: {n} trials, estimated {est['trial_hours']:.2f} device-hours, {est['gpu_hours']:.2f} GPU-hours "
          f"({how}; step-cost model and its measured figures: orchestrator/estimate.py)", file=out)
    return 0


def _print_groups(spec: ExperimentSpec, trials: list, studies: list, out) -> list:
    """The fused groups of the fixed trials (with each group's estimated peak memory) and why a trial runs alone;
    for the search stage, the group size its asks run in. Returns the groups."""
    from orchestrator.groups import estimate_peak_bytes, group_size, plan_groups, train_classes
    from orchestrator.trials import class_count

    classes = lambda cfg: train_classes(cfg, class_count(spec.data.root, cfg.data.dataset))  # noqa: E731
    groups, alone = plan_groups(trials, spec, lambda key: class_count(spec.data.root, key))
    for g in groups:
        cfg = g.members[0].config
        peak = estimate_peak_bytes(cfg, len(g.members), classes(cfg)) / 2 ** 30
        if len(g.members) > 1:
            print(f"group   {g.group_id}: {len(g.members)} members ({', '.join(t.trial_id for t in g.members)}), "
                  f"est. peak {peak:.2f} GiB", file=out)
        else:
            print(f"alone   {g.members[0].trial_id}: {alone.get(g.members[0].trial_id, '')}, est. peak {peak:.2f} GiB",
                  file=out)
    r = spec.resources
    if r.gpus_per_trial > 0 and r.fuse != "auto":  # a fixed size the memory estimate does not hold: split
        from hisf.engine.group import fusion_key
        from orchestrator.groups import GIB, MEMORY_SHARE, memory_fit

        seen = set()
        for g in groups:
            cfg = g.members[0].config
            key = fusion_key(cfg)
            fit = memory_fit(spec, cfg, classes(cfg))
            if key in seen or fit >= int(r.fuse):
                continue
            seen.add(key)
            need = estimate_peak_bytes(cfg, int(r.fuse), classes(cfg)) / GIB
            share = MEMORY_SHARE * r.gpu_memory_gib * r.gpus_per_trial
            print(f"split   {g.members[0].trial_id} and its kind: {r.fuse} members would need est. {need:.1f} GiB of "
                  f"the {share:.1f} GiB share (resources.gpu_memory_gib x gpus_per_trial x {MEMORY_SHARE}); "
                  f"groups of at most {fit}", file=out)
    for s in studies:
        k = min(spec.search.n_trials, group_size(spec, s.config, classes(s.config)))
        print(f"search  {s.study}: asks {k} trial(s) at a time, trained as one fused group" if k > 1 else
              f"search  {s.study}: one trial at a time (resources.fuse is {spec.resources.fuse})", file=out)
    return groups


def print_status(spec: ExperimentSpec, opts) -> int:
    from orchestrator.resume import STALE_TAG
    from orchestrator.tracking import find_tracker

    out = opts.out
    tracker = find_tracker(spec, opts)
    print(f"spec {spec.name} (hash {spec.hash}), tracking {opts.tracking_uri}", file=out)
    any_stage = False
    for stage in ("search", "final", "sweep"):
        run = tracker.latest_stage_run(stage) if tracker is not None else None
        if run is None:
            continue
        any_stage = True
        counts: dict[str, int] = {}
        # From the launch's record when it is current (orchestrator/records.py), else a search of its runs.
        members = tracker.members(run, use_record=not opts.full_read)
        for child in members:
            # A stale run was replaced by a rerun of its trial with another identity (orchestrator/resume.py).
            s = "stale" if STALE_TAG in child.data.tags else child.data.tags.get("hisf.status", "running")
            counts[s] = counts.get(s, 0) + 1
        changed = " (hash differs from the spec now)" if run.data.tags.get("hisf.spec_hash") != spec.hash else ""
        print(f"{stage:6s} run {run.info.run_id} {run.info.status}{changed}: "
              f"{', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'no trials yet'}", file=out)
        if stage != "search":
            print(f"  resume: {resume_preview(stage, spec, opts, tracker, run, members)}", file=out)
        if stage == "search" and "hisf.study_tag" in run.data.tags:
            import optuna

            from orchestrator.search import storage

            for g in search_groups(spec, run.data.tags["hisf.study_tag"]):
                try:
                    st = optuna.load_study(study_name=g.study, storage=storage(opts.optuna_storage))
                except KeyError:
                    print(f"  study {g.study}: not created yet", file=out)
                    continue
                states: dict[str, int] = {}
                for t in st.trials:
                    states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
                best = ""
                if states.get("complete"):
                    best = f", best {st.best_value:.2f} at {st.best_params}"
                print(f"  study {g.study}: {states}{best}", file=out)
    if not any_stage:
        print("nothing has run yet", file=out)
    return 0


def print_where(spec: ExperimentSpec, opts) -> None:
    out = opts.out
    print("", file=out)
    print("Where things are:", file=out)
    print(f"  trial outputs:   {Path(opts.workdir) / 'runs' / spec.name}", file=out)
    local = not opts.tracking_uri.startswith(("http://", "https://"))
    if local:
        print(f"  MLflow UI:       mlflow ui --backend-store-uri {shlex.quote(opts.tracking_uri)} --host 127.0.0.1", file=out)
    link = mlflow_ui_link("http://127.0.0.1:5000" if local else opts.tracking_uri, spec.name, opts.tracking_uri)
    if link:
        print(f"  {'then open:' if local else 'MLflow UI:':<17}{link}", file=out)
    if spec.search is not None:
        print(f"  Optuna dashboard: optuna-dashboard {shlex.quote(opts.optuna_storage)}", file=out)
    optuna = f" --optuna-storage {shlex.quote(opts.optuna_storage)}" if spec.search is not None else ""
    print(f"  report:          hisf-bench report {shlex.quote(spec.path)}"
          f" --tracking-uri {shlex.quote(opts.tracking_uri)}{optuna}", file=out)


def mlflow_ui_link(server: str, experiment: str, tracking_uri: str | None = None) -> str | None:
    """The experiment's runs table in the MLflow UI at `server`. MLflow 3's UI opens an experiment on what its
    global "GenAI / Model training" switch says (GenAI by default, whatever `mlflow.experimentKind` says), so
    the link names the workflow type itself."""
    from mlflow.tracking import MlflowClient

    try:
        exp = MlflowClient(tracking_uri or server).get_experiment_by_name(experiment)
    except Exception:  # an unreachable server: the rest of the summary still prints
        return None
    if exp is None:
        return None
    return f"{server.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


# ---- what `--resume` would do ------------------------------------------------------------------------------


def _trials_now(stage: str, spec: ExperimentSpec, opts, tracker) -> tuple[list, str, int]:
    """(the stage's trials as a resume would build them now, the search launch they take values from, how
    many searched trials cannot be judged because their study has no best values yet)."""
    if stage == "sweep":
        return expand_sweep(spec, opts.workdir), "", 0
    from orchestrator.search import best_values
    from orchestrator.spec import SpecError

    best, search_run_id, unknown = {}, "", set()
    if spec.searched_rows:
        run = tracker.latest_stage_run("search")
        search_run_id = run.info.run_id if run is not None else ""
        tag = run.data.tags.get("hisf.study_tag") if run is not None else None
        for g in search_groups(spec, tag or ""):
            try:
                best.update(best_values(opts.optuna_storage, [g]) if tag else {})
            except SpecError:
                pass
            if (g.row, g.dataset, g.point) not in best:
                unknown.add((g.row, g.dataset, g.point))
                best[(g.row, g.dataset, g.point)] = {}
    trials = expand_final(spec, opts.workdir, best)
    judged = [t for t in trials if not (spec.row(t.row).search and
                                        (t.row, t.dataset, tuple(p for p in t.point if p[0] in dict(spec.grid))) in unknown)]
    return judged, search_run_id, len(trials) - len(judged)


def resume_preview(stage: str, spec: ExperimentSpec, opts, tracker, run, members: list | None = None) -> str:
    """`--resume would reuse 2 of 4 trials, run 2: ...`, judged by identity against the launch `run` (its child
    runs `members` when the caller has read them)."""
    from orchestrator.context import stage_context
    from orchestrator.resume import LaunchRuns

    from orchestrator.spec import SpecError

    try:
        trials, search_run_id, unknown = _trials_now(stage, spec, opts, tracker)
    except SpecError as e:  # e.g. a launch of a stage the spec no longer has
        return f"not judged: {e}"
    ctx = stage_context(spec, opts, tracker.experiment_id, run.info.run_id, search_run_id)
    runs = LaunchRuns(members, ctx, tracker) if members is not None else LaunchRuns.read(tracker, run.info.run_id, ctx)
    plan = runs.plan(trials)
    kinds = [d.kind for d in plan.decisions]
    text = (f"--resume would reuse {kinds.count('reuse')} of {len(trials)} trials (finished as the same trial) "
            f"and run {len(plan.todo)} ({kinds.count('continue')} continued, {kinds.count('new')} new, "
            f"{kinds.count('rerun')} rerun)")
    if plan.rerun:
        text += f"; {plan.why_rerun()}"
    if unknown:
        text += f"; {unknown} searched trial(s) not judged: their study has no best values yet"
    return text


def dry_run_resume_preview(stage: str, spec: ExperimentSpec, opts) -> str:
    """The dry run's word on `--resume`, read from a local store only (a remote one may be slow to answer,
    and a dry run must not create a store)."""
    from orchestrator.tracking import find_tracker

    if opts.tracking_uri.startswith(("http://", "https://")):
        return "not checked against a remote tracking store here; `hisf-bench status` shows it"
    tracker = find_tracker(spec, opts)
    run = tracker.latest_stage_run(stage) if tracker is not None else None
    if run is None:
        return "no earlier launch of this stage: every trial runs"
    return f"latest launch {run.info.run_id}: " + resume_preview(stage, spec, opts, tracker, run)
