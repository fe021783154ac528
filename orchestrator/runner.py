"""Running a stage (sweep, search, final) end to end: data, Ray, MLflow parent run, Tuner, resume bookkeeping."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import ExperimentSpec
from orchestrator.trials import Trial, expand_final, expand_sweep, search_groups, trial_resources


@dataclass
class Options:
    workdir: str = "hisf-bench"
    address: str | None = None
    tracking_uri: str | None = None
    optuna_storage: str | None = None
    resume: bool = False
    dry_run: bool = False
    # Local Ray only: CPUs the embedded cluster offers (default: enough for max_concurrent_trials).
    num_cpus: int | None = None
    # The user declares that --workdir, data.root and the stores are on storage every node sees (a
    # multi-node cluster is otherwise refused when they look local: orchestrator.preflight.check_cluster).
    shared_storage: bool = False
    # Ray's own output on the console too (else only in <workdir>/logs/<spec>-<stage>.log).
    verbose: bool = False
    # Seconds between plain progress lines when the console is not a terminal.
    progress_every: float = 10.0
    out: Any = field(default_factory=lambda: sys.stdout)  # looked up when made: capture-friendly

    def resolved(self) -> "Options":
        from orchestrator.search import default_storage
        from orchestrator.tracking import default_tracking_uri

        wd = str(Path(self.workdir).resolve())
        return Options(workdir=wd, address=self.address,
                       tracking_uri=self.tracking_uri or default_tracking_uri(wd),
                       optuna_storage=self.optuna_storage or default_storage(wd),
                       resume=self.resume, dry_run=self.dry_run, num_cpus=self.num_cpus, out=self.out,
                       shared_storage=self.shared_storage, verbose=self.verbose, progress_every=self.progress_every)


@dataclass
class StageResult:
    stage: str
    parent_run_id: str
    trials: int
    skipped: int
    statuses: dict[str, int]
    results: dict[str, dict] = field(default_factory=dict)
    wall_seconds: float = 0.0


def worker_env() -> dict[str, str]:
    """The environment every Ray worker process starts with (runtime_env env_vars)."""
    repo = str(Path(__file__).resolve().parent.parent)
    return {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # cuBLAS reads it once, at a process's first CUDA matmul: a reused worker that trains a
            # `train.deterministic` trial after another can only have it from its start. :4096:8 is PyTorch's
            # own default workspace on H100/H200 (more than its default elsewhere), so other trials lose nothing.
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}


@contextlib.contextmanager
def ray_session(spec: ExperimentSpec, opts: Options):
    """Connect to `--address`, or start a small local Ray on 127.0.0.1 and stop it afterwards."""
    import ray

    # num_to_keep=1 forces a state snapshot per checkpoint; that is intended, the warning about it is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        yield
        return
    env = worker_env()
    if opts.address:
        ray.init(address=opts.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        r = spec.resources
        # A DDP trial also holds a sliver of a CPU while its workers run (trials.trial_resources).
        waiting = 0.01 * r.max_concurrent_trials if r.workers_per_trial > 1 else 0.0
        need = max(1, math.ceil(r.cpus_per_trial * r.workers_per_trial * r.max_concurrent_trials + waiting))
        # Ray resolves a loopback node address to the machine's own IP on purpose; the dashboard stays off.
        ray.init(num_cpus=opts.num_cpus or need, include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=False)
    try:
        yield
    finally:
        if not opts.address:
            ray.shutdown()


def prepare_data(spec: ExperimentSpec, out, opts: Options | None = None, needs_test: bool = True) -> None:
    """`data.demo: true`: build the demo dataset(s) under data.root unless already there; then the pre-flight
    checks on the driver (orchestrator.preflight): every dataset built and named as the spec names it, K shots
    per class, backbone weights resolved (a pretrained tag fetched once into the cache), and on a cluster
    (`--address`) stores and folders that every node sees. All before an MLflow run or a trial exists."""
    from orchestrator import preflight

    if spec.data.demo:
        _build_demo(spec, Path(spec.data.root), out)
    preflight.check(spec, needs_test=needs_test, out=out)
    # Every dataset is built now, so HiCroPL's descriptions are checked against each one's class names.
    from orchestrator.spec import check_descriptions

    check_descriptions(spec)
    if opts is not None and opts.address:
        # Connected here, before the stage's MLflow parent run; the stage's ray_session reuses the connection.
        with ray_session(spec, opts):
            preflight.check_cluster(spec, opts, preflight.alive_nodes(), out)


def _build_demo(spec: ExperimentSpec, root: Path, out) -> None:
    from data_shards.cli import main as data_main

    from data_shards.demo import DESCRIPTIONS_FOLDER, write_descriptions

    if not (root / DESCRIPTIONS_FOLDER / "demo_prompt.json").is_file():
        # HiCroPL's text teacher reads them (experiments/demo.yaml points its row at this folder).
        write_descriptions(root / DESCRIPTIONS_FOLDER)
    for key in spec.data.datasets:
        if (root / key / "manifest.parquet").is_file():
            continue
        raw = root / "_raw"
        print(f"building demo data {key!r} under {root}", file=out)
        rc = data_main(["demo", "--out", str(raw)]) or 0
        if rc == 0:
            # The tiny backbone reads 32 px images; storing the demo at 224 would only cost build time.
            rc = data_main(["build", "--dataset", key, "--root", str(raw), "--out", str(root / key),
                            "--image-size", "32", "--quiet"]) or 0
        if rc != 0:
            raise RuntimeError(f"data.demo: building demo data {key!r} failed (exit {rc})")


def run_context(spec: ExperimentSpec, opts: Options, tracker, parent_run_id: str) -> dict[str, Any]:
    from orchestrator.tracking import git_commit

    r = spec.resources
    return {
        "tracking_uri": opts.tracking_uri, "experiment_id": tracker.experiment_id, "parent_run_id": parent_run_id,
        "spec_name": spec.name, "spec_hash": spec.hash, "git_commit": git_commit(),
        "optuna_storage": opts.optuna_storage, "optuna_storage_display": _redact(opts.optuna_storage),
        "metric": spec.search.metric if spec.search else "val_acc",
        "pruner": spec.search.pruner if spec.search else "none",
        "startup_trials": spec.search.startup_trials if spec.search else 0,
        "workers_per_trial": r.workers_per_trial, "gpus_per_trial": r.gpus_per_trial,
        "cpus_per_trial": r.cpus_per_trial, "max_failures": r.max_failures,
        "storage_path": str(Path(opts.workdir) / "ray_results"),
        "keep_checkpoints": r.keep_checkpoints,
    }


def tracker_for(spec: ExperimentSpec, opts: Options):
    from orchestrator.tracking import Tracker

    local = opts.tracking_uri.startswith("sqlite:") or opts.tracking_uri.startswith("file:")
    artifacts = (Path(opts.workdir) / "mlartifacts").as_uri() if local else None
    Path(opts.workdir).mkdir(parents=True, exist_ok=True)
    return Tracker(opts.tracking_uri, spec.name, artifact_root=artifacts)


def run_trials(stage: str, spec: ExperimentSpec, trials: list[Trial], opts: Options) -> StageResult:
    """Sweep or final stage: a fixed list of trials, finished ones skipped on `--resume`."""
    started = time.perf_counter()
    prepare_data(spec, opts.out, opts)
    tracker = tracker_for(spec, opts)
    parent = tracker.stage_run(stage, spec.hash, opts.resume)
    finished = tracker.finished_trials(parent) if opts.resume else {}
    todo = [t for t in trials if t.trial_id not in finished]
    if not opts.resume:
        for t in todo:
            # A fresh stage starts from scratch: the engine would otherwise resume an old checkpoint.
            shutil.rmtree(t.config.output_dir, ignore_errors=True)
    print(f"[{stage}] {len(trials)} trials, {len(finished)} already finished, running {len(todo)} "
          f"(MLflow parent run {parent})", file=opts.out)
    ctx = run_context(spec, opts, tracker, parent)
    results: dict[str, dict] = {}
    if todo:
        from ray import tune

        from orchestrator.progress import StageProgress

        prior = _statuses(finished.values())
        with _stage_console(spec, stage, opts) as console, ray_session(spec, opts):
            progress = StageProgress(stage, len(trials), console, prior=prior, every=opts.progress_every,
                                     live=False if opts.verbose else None)
            grid = tune.Tuner(
                tune.with_resources(_trainable(), trial_resources(spec)),
                param_space={"trial": tune.grid_search([t.payload() for t in todo]), "ctx": ctx},
                tune_config=_tune_config(spec),
                run_config=_run_config(spec, opts, f"{spec.name}-{stage}-{parent[:8]}", progress),
            ).fit()
            progress.close()
            results = _collect(grid)
    return _finish(stage, tracker, parent, len(trials), finished, results, started)


def run_search(spec: ExperimentSpec, opts: Options) -> StageResult:
    from orchestrator.search import StudySearcher

    started = time.perf_counter()
    prepare_data(spec, opts.out, opts, needs_test=False)
    tracker = tracker_for(spec, opts)
    parent = tracker.stage_run("search", spec.hash, opts.resume)
    tag = parent[:8]
    prior = tracker.client.get_run(parent).data.tags.get("hisf.study_tag")
    tag = prior or tag
    groups = search_groups(spec, tag)
    tracker.set_tags(parent, {"hisf.study_tag": tag, "optuna.storage": _redact(opts.optuna_storage),
                              "optuna.studies": ",".join(g.study for g in groups)})
    finished_runs = tracker.finished_trials(parent) if opts.resume else {}
    finished = {tid: {**r.data.metrics, "hisf_status": r.data.tags.get("hisf.status")} for tid, r in finished_runs.items()}
    ctx = run_context(spec, opts, tracker, parent)
    searcher = StudySearcher(spec, groups, opts.optuna_storage, opts.workdir, ctx, finished=finished)
    todo = sum(max(0, spec.search.n_trials - searcher.asked[g.study]) for g in groups) + len(searcher.pending)
    print(f"[search] {len(groups)} stud{'y' if len(groups) == 1 else 'ies'} × {spec.search.n_trials} trials "
          f"({spec.search.sampler}, pruner {spec.search.pruner}), running {todo} (MLflow parent run {parent})",
          file=opts.out)
    results: dict[str, dict] = {}
    if todo:
        from ray import tune

        from orchestrator.progress import StageProgress

        total = len(groups) * spec.search.n_trials
        prior = _statuses(finished_runs.values())
        # Asked before but with no finished run: trials that failed (a failed trial is not asked again).
        prior["failed"] = prior.get("failed", 0) + max(0, total - todo - sum(prior.values()))
        metric = spec.search.metric
        done = [r[metric] for r in finished.values() if r.get("hisf_status") == "finished" and metric in r]
        with _stage_console(spec, "search", opts) as console, ray_session(spec, opts):
            progress = StageProgress("search", total, console, prior=prior, metric=metric,
                                     best=max(done) if done else None, every=opts.progress_every,
                                     live=False if opts.verbose else None)
            tc = _tune_config(spec)
            tc.search_alg = searcher
            tc.num_samples = -1
            grid = tune.Tuner(
                tune.with_resources(_trainable(), trial_resources(spec)),
                tune_config=tc,
                run_config=_run_config(spec, opts, f"{spec.name}-search-{parent[:8]}-{int(time.time())}", progress),
            ).fit()
            progress.close()
            results = _collect(grid)
    from orchestrator.search import best_values

    try:
        best = best_values(opts.optuna_storage, groups)
        tracker.set_tags(parent, {f"hisf.best.{g.row}.{g.dataset}": _fmt(best[(g.row, g.dataset, g.point)]) for g in groups})
    except Exception as e:  # a study with no completed trial: reported, the stage is marked failed below
        print(f"[search] {e}", file=opts.out)
    return _finish("search", tracker, parent, len(finished_runs) + len(results), finished_runs, results, started)


def run_final(spec: ExperimentSpec, opts: Options) -> StageResult:
    from orchestrator.search import best_values

    best = {}
    if spec.searched_rows:
        tracker = tracker_for(spec, opts)
        run = tracker.latest_stage_run("search")
        if run is None:
            from orchestrator.spec import SpecError

            raise SpecError(f"{spec.path}: final: no search stage found in {opts.tracking_uri}; "
                            f"run `hisf-bench search {spec.path}` first")
        best = best_values(opts.optuna_storage, search_groups(spec, run.data.tags["hisf.study_tag"]))
        for (row, dataset, _), values in best.items():
            print(f"[final] {row} on {dataset}: best {_fmt(values)}", file=opts.out)
    return run_trials("final", spec, expand_final(spec, opts.workdir, best), opts)


def run_sweep(spec: ExperimentSpec, opts: Options) -> StageResult:
    return run_trials("sweep", spec, expand_sweep(spec, opts.workdir), opts)


def _trainable():
    from orchestrator.tuning import tune_trainable

    return tune_trainable


def _tune_config(spec: ExperimentSpec):
    from ray import tune

    def name(t):
        return t.config["trial"]["trial_id"]

    return tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent_trials,
                           trial_name_creator=name, trial_dirname_creator=name, reuse_actors=True)


def _run_config(spec: ExperimentSpec, opts: Options, name: str, progress):
    from ray import tune

    from orchestrator.checkpoints import DropFinishedCheckpoints

    callbacks = [progress] + ([] if spec.resources.keep_checkpoints else [DropFinishedCheckpoints()])
    return tune.RunConfig(
        name=name, storage_path=str(Path(opts.workdir) / "ray_results"),
        failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0, callbacks=callbacks)


@contextlib.contextmanager
def _stage_console(spec: ExperimentSpec, stage: str, opts: Options):
    """Ray's output to <workdir>/logs/<spec>-<stage>.log (and the console with --verbose); yields the console."""
    from orchestrator.progress import log_path, ray_output_to_log

    log = log_path(opts.workdir, spec.name, stage)
    if not opts.verbose:
        print(f"[{stage}] Ray's output: {log} (--verbose shows it here)", file=opts.out)
    with ray_output_to_log(opts.out, log, opts.verbose) as console:
        yield console


def _statuses(runs) -> dict[str, int]:
    """status -> count over finished child runs (MLflow runs or result dicts)."""
    out: dict[str, int] = {}
    for r in runs:
        s = r.data.tags.get("hisf.status", "finished") if hasattr(r, "data") else r.get("hisf_status", "finished")
        out[s] = out.get(s, 0) + 1
    return out


def _collect(grid) -> dict[str, dict]:
    out = {}
    for res in grid:
        cfg = res.config or {}
        tid = (cfg.get("trial") or {}).get("trial_id")
        if tid is None:
            continue
        m = dict(res.metrics or {})
        status = m.get("hisf_status") if m.get("hisf_final") else "failed"
        if res.error is not None:
            status = "failed"
        error = str(res.error) if res.error else m.get("hisf_error")
        out[tid] = {**m, "trial_id": tid, "hisf_status": status, "error": error}
    return out


def _finish(stage, tracker, parent, n_trials, finished, results, started) -> StageResult:
    statuses: dict[str, int] = {}
    for s in [r.data.tags.get("hisf.status", "finished") for r in finished.values()] + \
             [r["hisf_status"] for r in results.values()]:
        statuses[s] = statuses.get(s, 0) + 1
    ok = statuses.get("failed", 0) == 0
    tracker.end_stage(parent, "FINISHED" if ok else "FAILED")
    return StageResult(stage=stage, parent_run_id=parent, trials=n_trials, skipped=len(finished),
                       statuses=statuses, results=results, wall_seconds=time.perf_counter() - started)


def _fmt(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))


def _redact(url: str | None) -> str:
    """Never write a database password into tags or logs."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
