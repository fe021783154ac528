"""The `hisf-bench` command line: one entry point dispatching to each package's own commands."""

from __future__ import annotations

import argparse
import sys

from orchestrator.context import DEFAULT_WORKDIR

STAGE_COMMANDS = ("sweep", "search", "final", "run", "status")
USAGE = "usage: hisf-bench {sweep,search,final,run,status,report,predict,eval,stores,data,train} ..."
HELP = f"""{USAGE}

Benchmark prompt-learning methods (HISF and its baselines) on a frozen CLIP: an experiment spec
(experiments/*.yaml) declares a table of the paper; these commands run it on Ray and report it.

commands:
  run SPEC        the whole spec: the search stage then the final stage when it has one, else the sweep
  sweep SPEC      every row x dataset x grid point x seed of the spec
  search SPEC     the Optuna search (validation metric only) for rows with `search: true`
  final SPEC      every row with the final seeds; searched rows take their study's best values
  status SPEC     each stage's progress, from MLflow and the Optuna studies
  report SPEC     tables, plots and study reports from the finished runs
  predict RUN_OR_DIR IMAGES...   top-k classes of image files by a finished trial's prompts
  eval RUN_OR_DIR --dataset KEY  accuracy, per-class accuracy, confusion matrix on a built dataset, to MLflow
  stores serve    PostgreSQL and an `mlflow server` for a cluster (`stores serve --root DIR`): prints the flags
  data ...        build datasets into shards (`hisf-bench data build`), describe them (`data info`), demo data
  train ...       train one trial config without Ray (`python -m hisf.train`, also under torchrun)

`hisf-bench COMMAND -h` shows a command's options; `hisf-bench --version` prints the version.
Start with: hisf-bench run experiments/demo.yaml"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"hisf-bench {version()}")
        return 0
    if argv[:1] == ["data"]:
        from data_shards.cli import main as data_main

        return data_main(argv[1:]) or 0
    if argv[:1] == ["train"]:
        from hisf.train import main as train_main

        return train_main(argv[1:]) or 0
    if argv[:1] == ["report"]:
        from orchestrator.report import main as report_main

        return report_main(argv[1:]) or 0
    if argv[:1] in (["predict"], ["eval"]):
        from orchestrator.predict_cli import eval_main, predict_main

        return (predict_main if argv[0] == "predict" else eval_main)(argv[1:])
    if argv[:1] == ["stores"]:
        from orchestrator.stores_cli import main as stores_main

        return stores_main(argv[1:])
    if argv[:1] and argv[0] in STAGE_COMMANDS:
        return stage_main(argv[0], argv[1:])
    print(f"{USAGE}\nerror: unknown command {argv[0]!r} (`hisf-bench` alone lists the commands)", file=sys.stderr)
    return 2


def version() -> str:
    """The installed distribution's version, else the source tree's pyproject.toml (a checkout on PYTHONPATH)."""
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        # The tree this module runs from wins over whatever copy pip installed elsewhere.
        return tomllib.loads(pyproject.read_text())["project"]["version"]
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("hisf-bench")
    except PackageNotFoundError:
        return "unknown"


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"hisf-bench {command}", description={
        "sweep": "Run the spec's grid (rows × datasets × grid × seeds) on Ray Tune.",
        "search": "Run the Optuna search stage (validation metric only) for rows with `search: true`.",
        "final": "Run every row with the final seeds; searched rows take their study's best values.",
        "run": "The whole spec: search then final when it has a search stage, else the sweep.",
        "status": "Show each stage's progress from the tracker and the Optuna studies.",
    }[command])
    p.add_argument("spec", help="experiment spec (experiments/*.yaml)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--optuna-storage", default=None,
                   help="Optuna RDB storage URL, any SQLAlchemy URL (default: sqlite:///<workdir>/optuna.db)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help="where trial outputs, Ray results and the default stores go (default: ./hisf-bench)")
    if command == "status":  # reads the stores only: the flags of a launch do nothing here
        p.add_argument("--full-read", action="store_true",
                       help="read every trial run from MLflow instead of each launch's record (orchestrator/records.py): slower; for runs edited by hand after their stage ended")
        return p
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally on 127.0.0.1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest run of the stage: a finished trial is reused when it is the same trial "
                        "(config, spec, data build, code), unfinished ones continue, others rerun fresh")
    p.add_argument("--dry-run", action="store_true", help="run the pre-flight checks (data, shots, weights), print the trials and their resources; start no trial")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: what the spec needs)")
    p.add_argument("--weights-cache", default=None, metavar="DIR",
                   help="cache for weights named by a pretrained tag, fetched once on the driver before any trial and "
                        "read by every trial (on a cluster: a folder every node mounts; default: open_clip's cache)")
    p.add_argument("--shared-storage", action="store_true",
                   help="declare that --workdir, data.root, --weights-cache and SQLite stores are on storage every "
                        "node of a multi-node cluster sees (otherwise such a cluster is refused when they look local)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output on the console (it always goes to <workdir>/logs/<spec>-<stage>.log)")
    return p


def stage_main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    from hisf.config import ConfigError
    from orchestrator.context import Options
    from orchestrator.spec import load_spec

    try:
        # Validated before anything imports Ray or touches a store.
        spec = load_spec(args.spec)
        from orchestrator.preflight import with_weights_cache

        spec = with_weights_cache(spec, getattr(args, "weights_cache", None))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch = {k: getattr(args, k) for k in ("address", "resume", "dry_run", "num_cpus", "shared_storage", "verbose",
                                            "full_read")
              if hasattr(args, k)}  # (`status` has only the last)
    opts = Options(workdir=args.workdir, tracking_uri=args.tracking_uri, optuna_storage=args.optuna_storage,
                   **launch).resolved()
    if not opts.verbose:
        import logging
        import os

        # MLflow announces creating and migrating its SQLite tables on first use, and prints "View run ... at"
        # links when a run on a server ends: not the user's concern (the summary links the runs table).
        # Importing mlflow resets its logger's level from MLFLOW_LOGGING_LEVEL, so set both, whatever the order.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from orchestrator import preflight

    # The stores and the workdir, in seconds, before anything waits on them (a dead server would hang minutes).
    reads_studies = spec.search is not None and bool(spec.searched_rows) and command in ("search", "final", "run", "status")
    try:
        if command == "status":
            from orchestrator.status import print_status

            preflight.check_stores(opts, reads_studies, dry_run=True, writes=False)
            return print_status(spec, opts)
        if opts.dry_run:
            from orchestrator.status import print_dry_run

            # The stores first (the plan's resume preview reads them), then the plan (it needs no data), then the
            # same checks a run makes before Ray starts (demo data not built yet is fine here): exit 2 when the
            # real run would stop there.
            preflight.check_stores(opts, reads_studies, dry_run=True)
            rc = print_dry_run(command, spec, opts)
            preflight.check(spec, needs_test=command != "search", dry_run=True, out=opts.out)
            return rc
        preflight.check_stores(opts, reads_studies)
        return _run(command, spec, opts, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(command: str, spec, opts, argv: list[str]) -> int:
    import shlex
    from pathlib import Path

    from orchestrator.workdir_lock import launch_lock

    # The command that continues this one: the same command and flags, with --resume.
    resume = shlex.join(["hisf-bench", command, *argv, *([] if "--resume" in argv else ["--resume"])])
    fresh = not Path(opts.workdir).exists()
    try:
        # One launch of a spec per workdir: a second one stops here, naming the holder.
        with launch_lock(opts.workdir, spec.name, shlex.join(["hisf-bench", command, *argv]), opts.out) as lock:
            try:
                return _run_stages(command, spec, opts, resume)
            finally:
                if fresh:
                    _drop_unused_workdir(Path(opts.workdir), lock)
    except Exception as e:
        from orchestrator.disk import disk_full

        # A full disk fails everything after it alike: one line, not the tracebacks of every layer.
        full = disk_full(e, opts.tracking_uri)
        if full is None:
            raise
        print(f"error: {full}; what finished is kept: free space there, then continue with: {resume}", file=sys.stderr)
        return 1


def _drop_unused_workdir(workdir, lock) -> None:
    """A launch that made the workdir and stopped before writing anything but its lock (a bad spec, data not
    built) leaves no workdir behind: the lock file, then the empty folders (rmdir removes only empty ones)."""
    import contextlib
    import os

    if sorted(p.name for p in workdir.iterdir()) != ["locks"] or os.listdir(lock.parent) != [lock.name]:
        return
    with contextlib.suppress(OSError):
        lock.unlink()
        os.rmdir(lock.parent)
        os.rmdir(workdir)


def _run_stages(command: str, spec, opts, resume: str) -> int:
    from orchestrator import runner
    from orchestrator.search import NoCompletedTrial
    from orchestrator.stage_end import StageInterrupted
    from orchestrator.status import print_where

    searched = spec.search is not None and bool(spec.searched_rows)
    stages = {"sweep": [runner.run_sweep], "search": [runner.run_search], "final": [runner.run_final],
              "run": [runner.run_search, runner.run_final] if searched else [runner.run_sweep]}[command]
    results, rc = [], 0
    try:
        for stage in stages:
            try:
                results.append(stage(spec, opts))
            except NoCompletedTrial as e:
                if command == "final":
                    raise
                # `run`: the search stage said so already; the final stage needs every study's best values.
                print(f"[final] not started: {e}; trials that failed are not retried: fix what failed them and "
                      f"run the spec again (`hisf-bench {command} {spec.path}`)", file=opts.out)
                rc = 1
            else:
                _print_stage(results[-1], opts.out)
    except StageInterrupted as e:
        print(e.summary(), file=opts.out)
        later = stages[len(results) + 1:]
        if later:
            print(f"[{command}] not started: {', '.join(s.__name__.removeprefix('run_') for s in later)}", file=opts.out)
        print(f"resume with: {resume}", file=opts.out)
        return 130
    except KeyboardInterrupt:
        print(f"[{command}] interrupted before any trial started; nothing to resume yet. Run again: "
              f"{resume}", file=opts.out)
        return 130
    print_where(spec, opts)
    failed = any(r.statuses.get("failed", 0) for r in results)
    return rc or (1 if failed else 0)


def _print_stage(r, out) -> None:
    from orchestrator.results import STATUS_KEY

    for tid, res in sorted(r.results.items()):
        if res.get(STATUS_KEY) == "failed":
            print(f"[{r.stage}] trial {tid} failed: {_last_line(res.get('error')) or 'see its MLflow run'}", file=out)
    print(f"[{r.stage}] done in {r.wall_seconds:.1f}s: {r.trials} trials "
          f"({', '.join(f'{v} {k}' for k, v in sorted(r.statuses.items()))}; {r.skipped} skipped as finished)",
          file=out)


def _last_line(text: str | None) -> str:
    """A Tune error is a whole traceback: its last line names the exception."""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:1000] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
