"""A `workers_per_trial: 2` trial runs DDP (gloo) through Ray Train V2's TorchTrainer inside the Tune trial."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from hisf.config import replace_path
from hisf.engine import run_trial
from orchestrator.spec import load_spec
from orchestrator.trials import expand_sweep
from tests.orchestrator.helpers import mlflow_children, run_cli, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_two_worker_trial_equals_one_process_with_double_batch(tmp_path, demo_root):
    epochs = 2
    spec_path = write_spec(tmp_path / "ddp.yaml", demo_root, name="ddp", epochs=epochs, shots=8, max_concurrent=1,
                           rows=[{"name": "HISF", "method": {"name": "hisf", "depth": 2}}])
    raw = yaml.safe_load(spec_path.read_text())
    raw["resources"].update(workers_per_trial=2, cpus_per_trial=1, max_failures=0)
    spec_path.write_text(yaml.safe_dump(raw))
    out = run_cli(["sweep", spec_path], cwd=tmp_path, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The workers' own output goes to the stage's log, not the console.
    assert "world_size=2" in (tmp_path / "hisf-bench" / "logs" / "ddp-sweep.log").read_text()
    assert "world_size=2" not in out.stdout + out.stderr
    # Finished and on record: no rank's engine checkpoint, nor Ray Train's or Tune's copy, is left.
    wd = tmp_path / "hisf-bench"
    assert not list((wd / "runs").rglob("state.pt"))
    assert [p for p in (wd / "ray_results").rglob("checkpoint_*") if p.is_dir()] == []
    assert list((wd / "ray_results").glob("*-ddp-*"))  # Ray Train's run folder was there (and is now empty of them)
    (run,) = mlflow_children(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}", "ddp")
    assert run.data.tags["hisf.status"] == "finished"
    client = MlflowClient(f"sqlite:///{tmp_path / 'hisf-bench' / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == list(range(epochs))
    assert {"prompts.pt", "config.yaml", "metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # docs/interfaces.md: 2 ranks x batch B sees the same global batches as 1 rank x 2B.
    (trial,) = expand_sweep(load_spec(spec_path), tmp_path / "x")
    cfg = replace_path(replace_path(trial.config, "train.batch_size", 8), "output_dir", str(tmp_path / "single"))
    ref = run_trial(cfg)
    assert run.data.metrics["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-4)
    for k in ("base_acc", "novel_acc", "val_acc"):
        assert run.data.metrics[k] == pytest.approx(ref[k], abs=1e-6), k
    # Per-class counts summed over the two ranks once (rank 0 logged them): each image counted once, as one rank does.
    for split in ("val", "base", "novel"):
        got = json.loads(Path(client.download_artifacts(run.info.run_id, f"eval/{split}.json",
                                                        str(tmp_path / "dl"))).read_text())
        assert got["confusion"] == json.loads((tmp_path / "single" / "eval" / f"{split}.json").read_text())["confusion"]

    # Every rank reports each epoch to Ray Train; rank 0's numbers reach the Tune trial, one row per epoch.
    from ray.tune import ExperimentAnalysis, ResultGrid

    (exp_dir,) = (tmp_path / "hisf-bench" / "ray_results").glob("ddp-sweep-*")
    (result,) = ResultGrid(ExperimentAnalysis(str(exp_dir)))
    df = result.metrics_dataframe
    epochs_df = df[df["hisf_final"] == False]  # noqa: E712 (a pandas mask)
    assert list(epochs_df["epoch"]) == list(range(epochs))
    assert list(epochs_df["hisf_status"]) == ["running"] * epochs
    ref_epochs = json.loads(Path(ref_path := tmp_path / "single" / "metrics.json").read_text())["epochs"]
    assert len(ref_epochs) == epochs, ref_path
    for row, ref_epoch in zip(epochs_df.to_dict("records"), ref_epochs):
        assert row["val_acc"] == pytest.approx(ref_epoch["val_acc"], abs=1e-6)
        assert row["train/loss"] == pytest.approx(ref_epoch["train/loss"], rel=1e-4)
    assert df["hisf_final"].tolist().count(True) == 1 and result.metrics["hisf_status"] == "finished"
    assert result.metrics["base_acc"] == pytest.approx(ref["base_acc"], abs=1e-6)
