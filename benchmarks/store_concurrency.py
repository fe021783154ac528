"""Stores under concurrent trials: the demo's tiny search trials at max_concurrent_trials 2, 4, 8, 16 against the
embedded SQLite stores and against PostgreSQL (+ an `mlflow server`, `hisf-bench stores serve`'s setup).

Each configuration runs `hisf-bench search` (HISF's λ1/λ2 by TPE with median pruning, tiny CLIP, demo data)
in a fresh workdir, then counts from the stores: trials finished (Optuna COMPLETE/PRUNED, MLflow runs
finished/pruned), metrics lost (epochs a run or the study should hold but does not), lock errors (retried
"database is locked" answers, and trials failed by one), and orchestration seconds per trial. Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/store_concurrency.py [--stores sqlite postgres]
        [--concurrency 2 4 8 16] [--trials 32] [--code DIR]
    PYTHONPATH=. python benchmarks/store_concurrency.py --writers 16 32 64 [--per-writer 10]

`--code DIR` runs the CLI of another checkout (e.g. an older commit's, to measure the stores as they were).
`--writers` measures the stores alone: processes that make a trial's writes (run, ~100 params, per-epoch
metrics, Optuna ask/report/should_prune/tell, finish) through the orchestrator's own code, with no training
in between, the most write pressure trials could ever put on the stores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def spec(path: Path, data: Path, name: str, trials: int, concurrency: int, epochs: int) -> Path:
    raw = {
        "name": name, "protocol": "base2new",
        "data": {"root": str(data), "datasets": ["demo"], "shots": 4, "demo": True},
        "base": {"backbone": {"name": "hisf-tiny", "pretrained": None}, "device": "cpu",
                 "train": {"preset": "paper", "epochs": epochs, "batch_size": 4, "precision": "fp32",
                           "warmup_epochs": 0, "eval_batch_size": 64}},
        "rows": [{"name": "HISF", "method": {"name": "hisf", "depth": 2}, "search": True}],
        "search": {"sampler": "tpe", "n_trials": trials, "startup_trials": 2, "seed": 1, "metric": "val_acc",
                   "pruner": "median", "params": {"method.lambda_le": {"low": 0.0, "high": 2.0},
                                                  "method.lambda_sa": {"low": 0.0, "high": 2.0}}},
        "final": {"seeds": [1]},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": concurrency, "max_failures": 2},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def count(tracking_uri: str, storage: str, name: str, epochs: int) -> dict:
    import optuna
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`hisf.trial_id` != ''", max_results=5000) if exp else []
    # This configuration's study (one PostgreSQL server holds every configuration's).
    studies = [n for n in optuna.study.get_all_study_names(storage) if n.startswith(name + ":")]
    assert len(studies) <= 1, studies
    trials = optuna.load_study(study_name=studies[0], storage=storage).get_trials(deepcopy=False) if studies else []
    by_number = {t.number: t for t in trials}
    lost = 0
    for r in runs:
        status = r.data.tags.get("hisf.status")
        t = by_number.get(int(r.data.tags.get("optuna.trial_number", -1)))
        steps = {m.step for m in client.get_metric_history(r.info.run_id, "val_acc")}
        # A finished run holds every epoch; a pruned one the epochs its study heard (and vice versa).
        want = set(range(epochs)) if status == "finished" else set(t.intermediate_values) if t else set()
        lost += len(want - steps) + (len(steps - set(t.intermediate_values)) if t is not None else 0)
        if status in ("finished", "pruned"):
            loss = {m.step for m in client.get_metric_history(r.info.run_id, "train/loss")}
            lost += len(want - loss)
    orch = [r.data.metrics["orchestration_seconds"] for r in runs if "orchestration_seconds" in r.data.metrics]
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"mlflow_runs": len(runs),
            "runs_finished": sum(r.data.tags.get("hisf.status") in ("finished", "pruned") for r in runs),
            "optuna_states": states, "metrics_lost": lost,
            "in_trial_orchestration_s": round(sum(orch) / len(orch), 3) if orch else None}


@contextlib.contextmanager
def stores(kind: str, base: Path):
    if kind == "sqlite":
        yield None
        return
    from orchestrator.stores import serving

    root = base / "pg"
    root.mkdir()
    for folder in (base, root):
        folder.chmod(0o711)  # PostgreSQL's own user (when run as root) must reach its data folder
    with serving(root / "stores", port=free_port(), pg_port=free_port(), workers=4) as st:
        yield st


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_demo(data: Path) -> None:
    """The demo dataset once, outside the timed sweeps (as `data.demo: true` would on the first one)."""
    from data_shards.cli import main as data_main

    if not (data / "demo" / "manifest.parquet").is_file():
        assert (data_main(["demo", "--out", str(data / "_raw")]) or 0) == 0
        assert (data_main(["build", "--dataset", "demo", "--root", str(data / "_raw"), "--out", str(data / "demo"),
                           "--image-size", "32", "--quiet"]) or 0) == 0


def one(kind: str, st, base: Path, data: Path, code: Path, c: int, trials: int, epochs: int) -> dict:
    name = f"conc-{kind}-{c}"
    wd = base / name
    wd.mkdir(parents=True)
    path = spec(wd / "spec.yaml", data, name, trials, c, epochs)
    if st is None:
        uri, storage = f"sqlite:///{wd / 'hisf-bench' / 'mlflow.db'}", f"sqlite:///{wd / 'hisf-bench' / 'optuna.db'}"
        flags = []
    else:
        uri, storage = st.tracking_uri, st.optuna_storage
        flags = ["--tracking-uri", uri, "--optuna-storage", storage]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "search", str(path), "--workdir",
                          str(wd / "hisf-bench"), "--num-cpus", str(c), *flags], cwd=wd, env=env,
                         capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    text = out.stdout + out.stderr + "".join(
        p.read_text(errors="replace") for p in (wd / "hisf-bench" / "logs").glob("*.log"))
    locked = len(re.findall(r"database is locked", text, flags=re.I))
    retried = len(re.findall(r"store unavailable \([^)]*locked", text, flags=re.I))
    failed = len(re.findall(r"trial \S+ failed", out.stdout))
    res = {"stores": kind, "concurrency": c, "trials": trials, "exit": out.returncode, "wall_s": round(wall, 1),
           "wall_s_per_trial": round(wall / trials, 2), "lock_messages": locked, "lock_retries_logged": retried,
           "trials_failed": failed, **count(uri, storage, name, epochs)}
    print(json.dumps(res), flush=True)
    return res


def writer(args: tuple) -> dict:
    """One store-only 'trial' process: the writes of `n` trials of `epochs` epochs through the orchestrator's own
    tracking and Optuna code (no training), as fast as the stores take them."""
    import logging

    import optuna

    from orchestrator.search import storage as open_storage
    from orchestrator.tracking import TrialRun

    uri, storage_url, exp_id, parent, study_name, k, n, epochs = args
    retries = []
    handler = logging.Handler()
    handler.emit = lambda record: retries.append(record.getMessage())
    logging.getLogger("hisf.stores").addHandler(handler)
    params = {f"p{i}": i for i in range(100)}  # a trial logs ~100 params (TrialConfig.flatten())
    errors, t0 = [], time.perf_counter()
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    for j in range(n):
        try:
            run = TrialRun(uri, exp_id, parent, f"w{k}-{j}", {"hisf.stage": "search"}, params)
            trial = study.ask()
            for e in range(epochs):
                run.log_metrics({"val_acc": 50.0 + e, "train/loss": 1.0 / (e + 1), "lr": 0.002}, step=e)
                trial.report(50.0 + e, e)
                trial.should_prune()
            study.tell(trial, 50.0 + epochs)
            run.finish("finished", {"val_acc": 50.0 + epochs})
        except Exception as exc:  # what the retries did not absorb
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    return {"seconds": time.perf_counter() - t0, "errors": errors,
            "lock_retries": sum("locked" in m for m in retries), "retries": len(retries)}


def writers(kind: str, st, base: Path, procs: int, per_proc: int, epochs: int) -> dict:
    """`procs` store-only writers at once (orchestrator.tracking + Optuna, no training): the stores' own limit."""
    import multiprocessing

    import optuna
    from mlflow.tracking import MlflowClient

    from orchestrator.search import storage as open_storage
    from orchestrator.tracking import Tracker

    wd = base / f"writers-{kind}-{procs}"
    wd.mkdir(parents=True)
    if st is None:
        uri, storage = f"sqlite:///{wd / 'mlflow.db'}", f"sqlite:///{wd / 'optuna.db'}"
    else:
        uri, storage = st.tracking_uri, st.optuna_storage
    name = f"writers-{kind}-{procs}"
    tracker = Tracker(uri, name, artifact_root=(wd / "artifacts").as_uri() if st is None else None)
    parent = tracker.stage_run("search", "bench", resume=False)
    optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize")
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        out = pool.map(writer, [(uri, storage, tracker.experiment_id, parent, name, k, per_proc, epochs)
                                for k in range(procs)])
    wall = time.perf_counter() - t0
    client = MlflowClient(uri)
    runs = tracker.children(parent)
    lost = sum(epochs - len({m.step for m in client.get_metric_history(r.info.run_id, "val_acc")}) for r in runs)
    trials = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
    errors = [e for o in out for e in o["errors"]]
    res = {"stores": kind, "writers": procs, "trials": procs * per_proc, "runs": len(runs),
           "runs_finished": sum(r.data.tags.get("hisf.status") == "finished" for r in runs),
           "optuna_complete": sum(t.state.name == "COMPLETE" for t in trials), "metrics_lost": lost,
           "errors": len(errors), "error_kinds": sorted({e.split(":")[0] for e in errors}),
           "lock_retries": sum(o["lock_retries"] for o in out), "retries": sum(o["retries"] for o in out),
           "wall_s": round(wall, 1), "trial_writes_per_s": round(procs * per_proc / wall, 1)}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stores", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--code", default=str(ROOT), help="checkout whose CLI runs the sweeps (default: this one)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the results (JSON lines) here")
    ap.add_argument("--writers", nargs="*", type=int, default=None,
                    help="instead of sweeps: this many store-only writer processes at once (e.g. 16 32 64)")
    ap.add_argument("--per-writer", type=int, default=10, help="trials each writer records (with --writers)")
    args = ap.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="hisf-store-conc-"))
    if args.writers:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        found = []
        for kind in args.stores:
            with stores(kind, base) as st:
                found += [writers(kind, st, base, n, args.per_writer, args.epochs) for n in args.writers]
        if args.out:
            Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in found))
        return
    data = base / "data"
    build_demo(data)
    results = []
    for kind in args.stores:
        with stores(kind, base) as st:
            for c in args.concurrency:
                results.append(one(kind, st, base, data, Path(args.code).resolve(), c, args.trials, args.epochs))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    print("\n| stores | concurrent | trials finished (Optuna) | MLflow runs finished | metrics lost | lock messages "
          "(retried) | trials failed | wall s/trial | in-trial orchestration s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        done = r["optuna_states"].get("COMPLETE", 0) + r["optuna_states"].get("PRUNED", 0)
        print(f"| {r['stores']} | {r['concurrency']} | {done}/{r['trials']} | {r['runs_finished']}/{r['trials']} | "
              f"{r['metrics_lost']} | {r['lock_messages']} ({r['lock_retries_logged']}) | {r['trials_failed']} | "
              f"{r['wall_s_per_trial']} | {r['in_trial_orchestration_s']} |")


if __name__ == "__main__":
    main()
