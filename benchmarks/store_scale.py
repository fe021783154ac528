"""Stores at scale: a 1,000-trial sweep of zero-shot tiny trials (4 at once) on PostgreSQL + an `mlflow server`,
then the time of `hisf-bench status` and `hisf-bench report` at 1,000 and at 10,000 recorded runs, each from the
launches' records and with `--full-read` (the extra runs written straight through the tracking API, shaped like
the sweep's own, no training, as a `--resume` launch of the sweep that ends with its record). Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/store_scale.py [--trials 1000] [--runs 10000]
        [--concurrency 4] [--stores postgres|sqlite] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from store_concurrency import build_demo, free_port  # noqa: E402


def write_spec(path: Path, data: Path, seeds: int, concurrency: int) -> Path:
    raw = {
        "name": "scale", "protocol": "base2new", "report": "base2new",
        "data": {"root": str(data), "datasets": ["demo"], "shots": 4},
        "base": {"backbone": {"name": "hisf-tiny", "pretrained": None}, "device": "cpu",
                 "train": {"epochs": 1, "batch_size": 4, "precision": "fp32", "warmup_epochs": 0,
                           "eval_batch_size": 64}},
        "rows": [{"name": "CLIP", "method": {"name": "zeroshot"}}],
        "final": {"seeds": list(range(1, seeds + 1))},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": concurrency, "max_failures": 2},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextlib.contextmanager
def stores(kind: str, base: Path):
    if kind == "sqlite":
        wd = base / "hisf-bench"
        yield f"sqlite:///{wd / 'mlflow.db'}", f"sqlite:///{wd / 'optuna.db'}"
        return
    from orchestrator.stores import serving

    root = base / "pg"
    root.mkdir(exist_ok=True)
    for folder in (base, root):
        folder.chmod(0o711)  # PostgreSQL's own user (when run as root) must reach its data folder
    with serving(root / "stores", port=free_port(), pg_port=free_port(), workers=4) as st:
        yield st.tracking_uri, st.optuna_storage


def cli(args: list[str], cwd: Path, timeout: int = 7200) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"hisf-bench {' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                         f"{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out


def status_and_report(spec: Path, base: Path, uri: str, storage: str, full_read: bool = False,
                      report: bool = True) -> dict:
    flags = ["--tracking-uri", uri, "--optuna-storage", storage] + (["--full-read"] if full_read else [])
    status_s, _ = cli(["status", str(spec), *flags, "--workdir", str(base / "hisf-bench")], base)
    if not report:
        return {"status_s": round(status_s, 1)}
    report_s, out = cli(["report", str(spec), *flags, "--out", str(base / ("report-full" if full_read else "report"))],
                        base)
    return {"status_s": round(status_s, 1), "report_s": round(report_s, 1), "report_says": out.stdout.splitlines()[0]}


def in_process(spec: Path, uri: str, storage: str, out: Path, sample: int = 100, trained: int = 100) -> dict:
    """A report's parts, timed one at a time in this process: reading the runs from the records and with a full read
    (same store, same moment), the whole report less its worst-classes section, and that section's downloads
    (two `eval/<split>.json` per table run) on `sample` of the table's runs that really ran (seeds up to
    `trained`: the copies add_runs writes have no records), as seconds per run."""
    from orchestrator.report import build, load_plan
    from orchestrator.report.classes import read_worst_classes
    from orchestrator.report.runs import read_runs, table_runs

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as `hisf-bench report` sets it
    plan = load_plan(spec)
    t0 = time.perf_counter()
    fast = read_runs(plan, uri)
    t1 = time.perf_counter()
    full = read_runs(plan, uri, full_read=True)
    t2 = time.perf_counter()
    reader, build.read_worst_classes = build.read_worst_classes, lambda *a, **k: {}
    try:
        build.build_report(plan, out, uri, storage)
    finally:
        build.read_worst_classes = reader
    t3 = time.perf_counter()
    chosen = table_runs(plan, fast)
    # Their records' per-class results left out: what is timed is reading them from the runs' own files.
    some = {k: dataclasses.replace(r, classes=None)
            for k, r in [(k, r) for k, r in chosen.items() if k[2] <= trained][:sample]}
    # The section's records: one at a time (as before), as the report reads them (16 at a time), then again from
    # the cache the second read left (a report re-rendered over the same finished runs).
    per_run = {}
    for name, kwargs in (("one_at_a_time", {"workers": 1}), ("parallel", {"cache": out / "classes-cache"}),
                         ("cached", {"cache": out / "classes-cache"})):
        t = time.perf_counter()
        read_worst_classes(plan, some, uri, **kwargs)
        per_run[name] = round((time.perf_counter() - t) / max(1, len(some)), 4)
    return {"read_runs_records_s": round(t1 - t0, 1), "read_runs_full_s": round(t2 - t1, 1),
            "same_runs": fast == full, "runs": len(fast.runs), "report_less_worst_classes_s": round(t3 - t2, 1),
            "table_runs": len(chosen), "worst_classes_s_per_run": per_run}


def add_runs(uri: str, spec: Path, total: int, threads: int = 8) -> float:
    """Runs for seeds up to `total` written as a `--resume` launch of the sweep with more seeds writes them: the
    sweep's parent run continued (Tracker.stage_run, which clears its record), runs copied from a real trial
    run's tags, params and metrics (only the trial id, seed and run name differ), then the stage ended by the
    driver's own call (Tracker.close_stage: the launch's record, then the parent's end); returns the seconds."""
    from mlflow.entities import Metric, Param

    from orchestrator.results import class_summaries
    from orchestrator.spec import load_spec
    from orchestrator.tracking import Tracker

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    tracker = Tracker(uri, "scale")
    client, exp_id = tracker.client, tracker.experiment_id
    t0 = time.perf_counter()
    parent = tracker.stage_run("sweep", load_spec(spec).hash, resume=True)
    template = client.search_runs([exp_id], "tags.`hisf.trial_id` = 'sweep-clip-demo-s1'")[0]
    have = {r.data.tags["hisf.trial_id"] for r in tracker.children(parent)}

    def one(seed: int) -> None:
        tid = f"sweep-clip-demo-s{seed}"
        if tid in have:
            return
        tags = {k: v for k, v in template.data.tags.items() if not k.startswith("mlflow.")}
        tags.update({"mlflow.parentRunId": parent, "hisf.trial_id": tid, "hisf.seed": str(seed)})
        run = client.create_run(exp_id, tags=tags, run_name=tid)
        now = int(time.time() * 1000)
        params = [Param(k, str(seed) if k == "seed" else v) for k, v in template.data.params.items()]
        metrics = [Metric(k, v, now, 0) for k, v in template.data.metrics.items()]
        for i in range(0, len(params), 900):
            client.log_batch(run.info.run_id, params=params[i:i + 900])
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(1, total + 1)))
    t1 = time.perf_counter()
    # What each trial would have reported of its per-class results (the template's, read once from its files).
    with tempfile.TemporaryDirectory() as tmp:
        summary = class_summaries(client.download_artifacts(template.info.run_id, "eval", tmp))
    tracker.close_stage(parent, classes={f"sweep-clip-demo-s{seed}": summary for seed in range(1, total + 1)})
    print(json.dumps({"close_stage_with_record_s": round(time.perf_counter() - t1, 1)}), flush=True)
    return t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--stores", default="postgres", choices=["postgres", "sqlite"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="hisf-store-scale-"))
    data = base / "data"
    build_demo(data)
    res: dict = {"stores": args.stores, "trials": args.trials, "concurrency": args.concurrency}
    with stores(args.stores, base) as (uri, storage):
        spec = write_spec(base / "scale.yaml", data, args.trials, args.concurrency)
        wall, out = cli(["sweep", str(spec), "--tracking-uri", uri, "--optuna-storage", storage, "--workdir",
                         str(base / "hisf-bench"), "--num-cpus", str(args.concurrency)], base)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("scale")
        runs = client.search_runs([exp.experiment_id], "tags.`hisf.trial_id` != ''", max_results=50000)
        orch = [r.data.metrics["orchestration_seconds"] for r in runs if "orchestration_seconds" in r.data.metrics]
        res.update({"sweep_wall_s": round(wall, 1), "sweep_s_per_trial": round(wall / args.trials, 3),
                    "runs_finished": sum(r.data.tags.get("hisf.status") == "finished" for r in runs),
                    "in_trial_orchestration_s_mean": round(sum(orch) / len(orch), 3),
                    "sweep_says": [ln for ln in out.stdout.splitlines() if "done in" in ln]})
        res[f"at_{args.trials}"] = status_and_report(spec, base, uri, storage)
        print(json.dumps(res), flush=True)
        res[f"at_{args.trials}_full_read"] = status_and_report(spec, base, uri, storage, full_read=True)
        print(json.dumps(res), flush=True)
        spec = write_spec(base / "scale.yaml", data, args.runs, args.concurrency)
        res["write_runs_s"] = round(add_runs(uri, spec, args.runs), 1)
        # Both commands from the records (the report's worst classes from what the trials reported), then status with
        # a full read (a full-read report would download every run's per-class files: timed apart, per run).
        res[f"at_{args.runs}"] = {**status_and_report(spec, base, uri, storage),
                                  "status_full_read_s": status_and_report(spec, base, uri, storage, full_read=True,
                                                                          report=False)["status_s"]}
        print(json.dumps(res), flush=True)
        res[f"at_{args.runs}_report_parts"] = in_process(spec, uri, storage, base / "report-parts", trained=args.trials)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
