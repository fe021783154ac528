"""The MLflow run of `hisf-bench eval`: a new run in the source trial run's experiment, tagged `hisf.kind=eval` and
`hisf.source_run` (its link to the trial), holding the evaluation's metrics and its eval/ artifacts.

It is no stage's child and carries no `hisf.trial_id`: status, reports, `--resume` and searches never read it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orchestrator.store_retry import retry as store_retry


def retry(fn):
    return store_retry(fn, "MLflow call (hisf-bench eval)")

KIND = "eval"
EVAL_EXPERIMENT = "hisf-bench-eval"  # where evaluations of a folder that no tracked run knows are logged


def run_of_folder(client, folder: Path):
    """The finished trial run whose output_dir is `folder`, in any experiment of the store; None when none is."""
    flt = f"params.output_dir = '{folder}' and tags.`hisf.trial_id` != ''"
    experiments = [e.experiment_id for e in retry(lambda: client.search_experiments())]
    if not experiments:
        return None
    found = retry(lambda: client.search_runs(experiments, filter_string=flt, max_results=1,
                                             order_by=["attributes.start_time DESC"]))
    return found[0] if found else None


def _experiment(client, tracking_uri: str) -> str:
    from orchestrator.tracking import EXPERIMENT_KIND

    exp = retry(lambda: client.get_experiment_by_name(EVAL_EXPERIMENT))
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        # A local store keeps its artifacts beside it, as `run` does (<workdir>/mlartifacts).
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return retry(lambda: client.create_experiment(EVAL_EXPERIMENT, artifact_location=location, tags=EXPERIMENT_KIND))


def log_evaluation(trial: Any, result: Any, eval_dir: Path, data_root: str, ui_url: str | None = None,
                   tracking_uri: str | None = None, workdir: str | Path = "hisf-bench") -> None:
    """Log `result` (orchestrator.predict.Evaluation) of `trial` (LoadedTrial); sets its run id, experiment and link."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from orchestrator.context import default_tracking_uri
    from orchestrator.report.build import DEFAULT_UI_URL
    from orchestrator.report.index import RunLinks
    from orchestrator.tracking import param_str

    uri = tracking_uri or trial.tracking_uri or default_tracking_uri(workdir)
    client = MlflowClient(uri)
    source = trial.run
    if source is None and trial.folder is not None:
        source = run_of_folder(client, trial.folder)
    exp_id = source.info.experiment_id if source is not None else _experiment(client, uri)
    cfg, rec = trial.config, result.record
    source_name = source.data.tags.get("mlflow.runName", source.info.run_id) if source is not None else str(trial.folder)
    tags = {"hisf.kind": KIND, "hisf.dataset": result.dataset, "hisf.split": result.split,
            "hisf.classes": result.classes, "hisf.method": cfg.method.name, "hisf.seed": str(cfg.seed),
            "hisf.trained_on": cfg.data.dataset}
    if source is not None:
        tags["hisf.source_run"] = source.info.run_id
        link = RunLinks(ui_url or DEFAULT_UI_URL, exp_id).run(source.info.run_id)
        tags["mlflow.note.content"] = (f"Evaluation of [{source_name}]({link}) on {result.dataset} {result.split} "
                                       f"({result.classes} classes), by `hisf-bench eval`.")
    if trial.folder is not None:
        tags["hisf.source_dir"] = str(trial.folder)
    name = f"eval · {source_name} · {result.dataset} {result.split} {result.classes}"
    run = retry(lambda: client.create_run(exp_id, tags=tags, run_name=name))
    run_id = run.info.run_id
    params = {"source_run": source.info.run_id if source is not None else "", "source_dir": str(trial.folder or ""),
              "dataset": result.dataset, "data_root": data_root, "split": result.split, "classes": result.classes,
              "metric": rec["metric"], "method.name": cfg.method.name, "seed": cfg.seed}
    metrics = {rec["metric"]: rec["accuracy"], "mean_class_acc": rec["mean_class_accuracy"], "images": rec["total"]}
    now = int(time.time() * 1000)
    retry(lambda: client.log_batch(
        run_id, params=[Param(k, param_str(v)) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]))
    retry(lambda: client.log_artifacts(run_id, str(eval_dir), artifact_path="eval"))
    retry(lambda: client.set_terminated(run_id, "FINISHED"))
    result.run_id, result.experiment_id = run_id, exp_id
    result.link = RunLinks(ui_url or DEFAULT_UI_URL, exp_id).run(run_id)
