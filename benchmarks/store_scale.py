"""Stores at scale: a 1,000-trial sweep of zero-shot tiny trials (4 at once) on PostgreSQL + an `mlflow server`,
then the time of `hisf-bench status` and `hisf-bench report` at 1,000 and at 10,000 recorded runs (the extra
runs written straight through the tracking API, shaped like the sweep's own, no training). Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/store_scale.py [--trials 1000] [--runs 10000]
        [--concurrency 4] [--stores postgres|sqlite] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def status_and_report(spec: Path, base: Path, uri: str, storage: str) -> dict:
    flags = ["--tracking-uri", uri, "--optuna-storage", storage]
    status_s, _ = cli(["status", str(spec), *flags, "--workdir", str(base / "hisf-bench")], base)
    report_s, out = cli(["report", str(spec), *flags, "--out", str(base / "report")], base)
    return {"status_s": round(status_s, 1), "report_s": round(report_s, 1), "report_says": out.stdout.splitlines()[0]}


def add_runs(uri: str, total: int, threads: int = 8) -> float:
    """Runs for seeds up to `total` under the sweep's parent run, copied from a real trial run's tags, params
    and metrics (only the trial id, seed and run name differ); returns the seconds it took."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("scale")
    parent = client.search_runs([exp.experiment_id], "tags.`hisf.kind` = 'stage'", max_results=1)[0]
    template = client.search_runs([exp.experiment_id], "tags.`hisf.trial_id` = 'sweep-clip-demo-s1'")[0]
    have = {r.data.tags["hisf.trial_id"] for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50000)}

    def one(seed: int) -> None:
        tid = f"sweep-clip-demo-s{seed}"
        if tid in have:
            return
        tags = {k: v for k, v in template.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"}
        tags.update({"hisf.trial_id": tid, "hisf.seed": str(seed)})
        run = client.create_run(exp.experiment_id, tags=tags, run_name=tid)
        now = int(time.time() * 1000)
        params = [Param(k, str(seed) if k == "seed" else v) for k, v in template.data.params.items()]
        metrics = [Metric(k, v, now, 0) for k, v in template.data.metrics.items()]
        for i in range(0, len(params), 900):
            client.log_batch(run.info.run_id, params=params[i:i + 900])
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(1, total + 1)))
    return time.perf_counter() - t0


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
        res["write_runs_s"] = round(add_runs(uri, args.runs), 1)
        spec = write_spec(base / "scale.yaml", data, args.runs, args.concurrency)
        res[f"at_{args.runs}"] = status_and_report(spec, base, uri, storage)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
