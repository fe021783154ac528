"""Real MLflow stores and Optuna studies with known numbers, laid out as the orchestrator tracks them."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient


def spec_dict(name="tbl", datasets=("caltech101", "oxford_pets"), rows=None, seeds=(1, 2, 3), grid=None,
              protocol="base2new", report="base2new", targets=()):
    rows = rows or [
        {"name": "CLIP", "method": {"name": "zeroshot"}},
        {"name": "MaPLe", "method": {"name": "maple"}},
        {"name": "HISF", "method": {"name": "hisf"}, "search": True},
    ]
    spec = {
        "name": name, "protocol": protocol, "report": report,
        "data": {"root": "data", "datasets": list(datasets), "shots": 16, "targets": list(targets)},
        "rows": rows,
        "search": {"sampler": "tpe", "n_trials": 6, "seed": 1, "metric": "val_acc", "pruner": "median",
                   "params": {"method.lambda_le": {"low": 0.0, "high": 2.0},
                              "method.lambda_sa": {"low": 0.0, "high": 2.0}}},
        "final": {"seeds": list(seeds)},
    }
    if grid:
        spec["grid"] = grid
    return spec


def known_metrics(rng: np.random.Generator, protocol: str, targets=()) -> dict[str, float]:
    if protocol == "base2new":
        b, n = float(rng.uniform(50, 95)), float(rng.uniform(40, 90))
        return {"base_acc": b, "novel_acc": n, "hm": 2 * b * n / (b + n), "val_acc": float(rng.uniform(40, 95))}
    out = {"acc": float(rng.uniform(50, 80)), "val_acc": float(rng.uniform(40, 95))}
    out.update({f"target/{t}": float(rng.uniform(20, 95)) for t in targets})
    return out


def write_store(tmp_path: Path, spec: dict, skip=(), running=(), failed=(), variants=None, stage="final",
                seed_rng=0, extra_tags=None, artifacts: Path | None = None):
    """Write one finished child run per (row, variant, dataset, seed), minus `skip`; returns (uri, runs).

    `skip`/`running`/`failed` hold (row, dataset, seed) keys: no run, a run left RUNNING without metrics,
    a run marked hisf.status=failed. `runs` maps each key (row, variant values, dataset, seed) to its
    run id and metrics, the reference the tests compare the report against. `extra_tags(row, dataset, seed)`
    gives more tags for a run (e.g. its `env.*` environment record); `artifacts`: the experiment's artifact folder.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(spec["name"], artifact_location=artifacts.as_uri() if artifacts else None)
    parent = client.create_run(exp, tags={"hisf.stage": stage, "hisf.kind": "stage",
                                          "hisf.spec": spec["name"]}).info.run_id
    rng = np.random.default_rng(seed_rng)
    variants = variants or [()]
    runs = {}
    for row in spec["rows"]:
        for values in variants:
            for dataset in spec["data"]["datasets"]:
                for seed in spec["final"]["seeds"]:
                    key3 = (row["name"], dataset, seed)
                    metrics = known_metrics(rng, spec["protocol"], spec["data"].get("targets", ()))
                    if key3 in skip:
                        continue
                    status = "failed" if key3 in failed else ("running" if key3 in running else "finished")
                    tags = {
                        "mlflow.parentRunId": parent, "hisf.spec": spec["name"], "hisf.stage": stage,
                        "hisf.trial_id": f"{row['name']}-{dataset}-{seed}-{len(runs)}", "hisf.row": row["name"],
                        "hisf.dataset": dataset, "hisf.method": row["method"]["name"], "hisf.seed": str(seed),
                        "hisf.protocol": spec["protocol"],
                    }
                    if status != "running":
                        tags["hisf.status"] = status
                    if extra_tags is not None:
                        tags.update(extra_tags(row["name"], dataset, seed))
                    run_id = client.create_run(exp, tags=tags, start_time=int(time.time() * 1000)).info.run_id
                    params = [Param("seed", str(seed)), Param("method.name", row["method"]["name"])]
                    params += [Param(k, str(v)) for k, v in values]
                    logged = metrics if status == "finished" else {}
                    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in logged.items()],
                                     params=params, tags=[RunTag("hisf.depth", dict(values).get("method.depth", "9"))])
                    if status != "running":
                        client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")
                    runs[(row["name"], tuple(values), dataset, seed)] = (run_id, logged, status)
    client.set_terminated(parent, "FINISHED")
    return uri, exp, runs


def write_study(tmp_path: Path, name: str, n_trials: int = 8, with_mlflow=None):
    """A real TPE study over λ1, λ2 with a known objective and reported validation curves."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0), load_if_exists=True)

    def objective(trial):
        le = trial.suggest_float("method.lambda_le", 0.0, 2.0)
        sa = trial.suggest_float("method.lambda_sa", 0.0, 2.0)
        for epoch in range(3):
            trial.report(50 + 10 * epoch - (le - 1.2) ** 2 - (sa - 0.4) ** 2, epoch)
        return 80 - 5 * (le - 1.2) ** 2 - 3 * (sa - 0.4) ** 2

    study.optimize(objective, n_trials=n_trials)
    if with_mlflow is not None:  # cross-link trials to search-stage MLflow runs as the orchestrator does
        uri, exp = with_mlflow
        client = MlflowClient(tracking_uri=uri)
        parent = client.create_run(exp, tags={"hisf.stage": "search", "hisf.kind": "stage",
                                              "optuna.studies": name}).info.run_id
        for t in study.trials:
            client.create_run(exp, tags={"mlflow.parentRunId": parent, "hisf.stage": "search", "hisf.trial_id": f"search-{t.number}",
                                         "hisf.row": "HISF", "hisf.dataset": "caltech101", "hisf.seed": "1",
                                         "optuna.study": name, "optuna.trial_number": str(t.number),
                                         "hisf.status": "finished"})
    return storage, study


def png_colours(path: Path) -> int:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    flat = (img[..., :3].reshape(-1, 3) * 255).astype(np.uint8)
    return len(np.unique(flat, axis=0))


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is required for the render test (Debian: apt-get install -y chromium)"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_errors(stderr: str) -> list[str]:
    # Chromium logs page console output as `...:CONSOLE:<line>] "<message>", source: ...`.
    return [l for l in stderr.splitlines() if ":CONSOLE" in l and ("Uncaught" in l or "ERROR:CONSOLE" in l
                                                                   or "Error" in l)]
