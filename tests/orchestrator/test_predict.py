"""`hisf-bench predict` and `hisf-bench eval` on a real finished trial (hisf-tiny, trained here), in a real MLflow store
laid out as the orchestrator logs it: top-k equals the model's own logits on image files written to disk, eval's
new run links its source and holds the numbers a direct count gives, bad input is named; and results_frame."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.predict import evaluate, load_trial, predict
from tests.orchestrator.report.helpers import spec_dict, write_store

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo dataset built exact (the shards hold the image files themselves), one HISF trial trained on it, and a
    real MLflow store holding that trial's run with the engine's artifacts (logged by orchestrator.tracking)."""
    from data_shards.cli import main as data_main
    from hisf.config import TrialConfig
    from hisf.engine import run_trial
    from orchestrator.tracking import TrialRun

    tmp = tmp_path_factory.mktemp("predict")
    raw, root = tmp / "raw", tmp / "shards"
    assert data_main(["demo", "--out", str(raw), "--classes", "6", "--train", "8", "--val", "4", "--test", "5",
                      "--size", "40"]) == 0
    assert data_main(["build", "--dataset", "demo", "--root", str(raw), "--out", str(root / "demo"), "--exact",
                      "--quiet"]) == 0
    out = tmp / "runs" / "pred" / "final-hisf-demo-s1"
    cfg = TrialConfig.from_dict({
        "protocol": "base2new", "seed": 1, "backbone": {"name": "hisf-tiny", "pretrained": None},
        "method": {"name": "hisf", "depth": 2}, "data": {"root": str(root), "dataset": "demo", "shots": 4},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32", "eval_batch_size": 16, "warmup_epochs": 0,
                  "lr": 0.05, "log_every": 0},
        "output_dir": str(out), "device": "cpu"})
    captured = {}

    class Capture:
        def on_trial_end(self, metrics, artifacts):
            captured.update(metrics=metrics, artifacts=artifacts)

    run_trial(cfg, [Capture()])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pred", artifact_location=(tmp / "mlartifacts").as_uri())
    parent = client.create_run(exp, tags={"hisf.stage": "final", "hisf.kind": "stage"}).info.run_id
    run = TrialRun(uri, exp, parent, "final-hisf-demo-s1", {"hisf.stage": "final", "hisf.row": "HISF",
                                                           "hisf.dataset": "demo", "hisf.seed": 1}, cfg.flatten(),
                   run_name="HISF · demo · seed 1")
    run.log_metrics(captured["metrics"], step=0)
    run.log_artifacts(captured["artifacts"])
    run.finish("finished")
    return {"tmp": tmp, "raw": raw, "root": root, "out": out, "cfg": cfg, "uri": uri, "run_id": run.run_id,
            "exp": exp, "parent": parent, "metrics": captured["metrics"]}


def _direct_model(t):
    """The trial's model rebuilt by hand from hisf's own API (not orchestrator.predict)."""
    from hisf.engine.export import load_prompts
    from hisf.model.backbone import load_backbone
    from hisf.model.methods import build_method

    payload = torch.load(t["out"] / "prompts.pt", weights_only=True)
    backbone = load_backbone(t["cfg"].backbone)
    model = build_method(t["cfg"].method, backbone, payload["classnames"], template=payload["template"],
                         dataset="demo")
    load_prompts(t["out"] / "prompts.pt", model, t["cfg"])
    return model.eval()


def test_artifacts_are_in_the_trial_run(trained):
    arts = {a.path for a in MlflowClient(trained["uri"]).list_artifacts(trained["run_id"], "eval")}
    assert arts == {f"eval/{s}.{e}" for s in ("val", "base", "novel") for e in ("json", "png")}


def test_predict_top_k_equals_the_models_own_logits_on_files_on_disk(trained, tmp_path, capsys):
    """Images of the exact build's test split, read from disk, against the eval loader's batches of the same files
    (data_shards' own evaluation transform) through a model built by hand; and a few odd-sized files of our own."""
    from data_shards import make_loader, open_dataset

    ds = open_dataset(trained["root"] / "demo")
    test = ds.select("test", None, 1, "all")
    model = _direct_model(trained)
    model.set_classnames(test.classnames, template=ds.template, dataset="demo")
    bb = model.backbone
    loader = make_loader(test, train=False, batch_size=7, image_size=bb.image_size, mean=bb.mean, std=bb.std)
    with torch.no_grad():
        logits = torch.cat([model(x, shared=True)[0] for x, _ in loader])
    manifest = pd.read_parquet(trained["root"] / "demo" / "manifest.parquet")
    paths = dict(zip(manifest["key"], manifest["path"]))
    files = [trained["raw"] / "demo" / "images" / paths[k] for k in test.keys]
    trial = load_trial(trained["out"])
    assert trial.classnames == ("red circle", "green square", "blue triangle")  # its training (base) classes
    preds = predict(trial, files, dataset="demo", top_k=3, batch_size=4)
    probs = logits.softmax(-1)
    for p, row, prob in zip(preds, logits, probs):
        top = prob.topk(3)
        assert [c for c, _, _ in p.top] == [test.classnames[i] for i in top.indices.tolist()]
        assert [q for _, q, _ in p.top] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert [lg for _, _, lg in p.top] == pytest.approx(row[top.indices].tolist(), rel=1e-5, abs=1e-5)

    # Files of any size and format: resized and centre-cropped as the loaders do; the trial's training classes.
    rng = np.random.default_rng(0)
    mine = []
    for i, (size, ext) in enumerate((((61, 37), "png"), ((30, 90), "jpg"), ((32, 32), "bmp"))):
        mine.append(tmp_path / f"img{i}.{ext}")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(mine[-1])
    from data_shards import eval_images

    batch = eval_images([f.read_bytes() for f in mine], bb.image_size, bb.mean, bb.std)
    assert batch.shape == (3, 3, bb.image_size, bb.image_size)
    model.set_classnames(trial.classnames, template=ds.template, dataset="demo")
    with torch.no_grad():
        own = model(batch, shared=True)[0]
    assert cli(["predict", str(trained["out"]), *map(str, mine), "--json", "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == list(trial.classnames) and out["method"] == "hisf"
    for rec, row in zip(out["predictions"], own):
        top = row.softmax(-1).topk(2)
        assert [r["class"] for r in rec["top_k"]] == [trial.classnames[i] for i in top.indices.tolist()]
        assert [r["probability"] for r in rec["top_k"]] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert cli(["predict", str(trained["out"]), str(mine[0]), "--classes", "a red circle", "a cat"]) == 0
    text = capsys.readouterr().out
    assert "top 2 of 2 classes (the classes given)" in text and "1. a " in text and str(mine[0]) in text


def test_eval_logs_a_linked_run_with_the_numbers_of_a_direct_count(trained, tmp_path, capsys):
    """By run id (artifacts downloaded) and by folder (its run found by output_dir): a new run in the source's
    experiment, tagged hisf.source_run, whose per-class numbers equal the trial's own eval/base.json and a count by
    hand of the model's predictions."""
    from data_shards import make_loader, open_dataset

    own = json.loads((trained["out"] / "eval" / "base.json").read_text())
    ds = open_dataset(trained["root"] / "demo")
    base = ds.select("test", None, 1, "base")
    model = _direct_model(trained)
    bb = model.backbone
    labels, preds = [], []
    with torch.no_grad():
        for x, y in make_loader(base, train=False, batch_size=5, image_size=bb.image_size, mean=bb.mean, std=bb.std):
            preds += model(x, shared=True)[0].argmax(-1).tolist()
            labels += y.tolist()
    c = len(base.classnames)
    matrix = [[sum(1 for t, p in zip(labels, preds) if (t, p) == (i, j)) for j in range(c)] for i in range(c)]
    assert own["confusion"] == matrix

    client = MlflowClient(trained["uri"])
    args = ["--tracking-uri", trained["uri"], "--classes", "base", "--dataset", "demo"]
    assert cli(["eval", trained["run_id"], *args]) == 0
    text = capsys.readouterr().out
    assert f"HISF · demo · seed 1 (run {trained['run_id']}) on demo test (base classes: 3, 15 images)" in text
    assert f"top-1 {trained['metrics']['base_acc']:.2f}%" in text and "worst classes: " in text
    new_id = text.split("MLflow run ")[1].split(":")[0]
    assert f"/#/experiments/{trained['exp']}/runs/{new_id}" in text
    for source in (trained["run_id"], str(trained["out"])):
        res = evaluate(load_trial(source, trained["uri"]), "demo", classes="base", tracking_uri=trained["uri"],
                       out_dir=tmp_path / "kept")
        run = client.get_run(res.run_id)
        assert run.info.experiment_id == trained["exp"] and run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["hisf.source_run"] == trained["run_id"] and tags["hisf.kind"] == "eval"
        assert (tags["hisf.dataset"], tags["hisf.split"], tags["hisf.classes"]) == ("demo", "test", "base")
        assert "hisf.trial_id" not in tags and "mlflow.parentRunId" not in tags  # no stage reads it as a trial
        assert run.data.metrics["base_acc"] == trained["metrics"]["base_acc"] == res.accuracy
        got = json.loads(open(client.download_artifacts(res.run_id, "eval/base.json", str(tmp_path / res.run_id))).read())
        for key in ("classnames", "confusion", "per_class_accuracy", "support", "accuracy"):
            assert got[key] == own[key], key
        assert {a.path for a in client.list_artifacts(res.run_id, "eval")} == {"eval/base.json", "eval/base.png"}
        assert (tmp_path / "kept" / "eval" / "base.png").is_file()
    # A copy of the folder that no tracked run knows: logged to the store's hisf-bench-eval experiment, by folder.
    import shutil

    copy = shutil.copytree(trained["out"], tmp_path / "copy")
    res = evaluate(load_trial(copy, trained["uri"]), classes="base", tracking_uri=trained["uri"])
    run = client.get_run(res.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "hisf-bench-eval"
    assert run.data.tags["hisf.source_dir"] == str(copy.resolve()) and "hisf.source_run" not in run.data.tags
    assert run.data.metrics["base_acc"] == trained["metrics"]["base_acc"]
    # Every class of the test split, with its own metric name.
    everything = evaluate(load_trial(trained["out"], trained["uri"]), log=False)
    assert everything.run_id is None and everything.record["metric"] == "acc" and everything.record["total"] == 30


def test_bad_input_is_named(trained, tmp_path, capsys):
    uri = trained["uri"]
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notimage.png").write_text("hello")
    client = MlflowClient(uri)
    failed = client.create_run(trained["exp"], tags={"hisf.status": "failed"}).info.run_id
    client.set_terminated(failed, "FAILED")
    cases = [
        (["predict", "0" * 32, str(image), "--tracking-uri", uri], f"run {'0' * 32}: no such MLflow run in {uri}"),
        (["predict", "0" * 32, str(image), "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "no MLflow store at"),
        (["predict", failed, str(image), "--tracking-uri", uri], f"run {failed} (failed): has no prompts.pt artifact"),
        (["predict", str(tmp_path / "empty"), str(image)], "empty: no prompts.pt and no config.yaml in this folder"),
        (["predict", "nothing-here", str(image)], "nothing-here: neither a trial folder"),
        (["predict", str(image), str(image)], "x.png: a file; expected a trial folder"),
        (["predict", str(trained["out"]), str(tmp_path / "notimage.png")], "notimage.png: not an image file"),
        (["predict", str(trained["out"]), str(tmp_path / "missing.png")], "missing.png: image file not found"),
        (["predict", str(trained["out"]), str(image), "--top-k", "0"], "--top-k: 0; expected an integer >= 1"),
        (["predict", str(trained["out"]), str(image), "--dataset", "demo", "--classes", "red circle", "purple blob"],
         "--classes: 'purple blob' not among the 6 classes of dataset 'demo'"),
        (["predict", str(trained["out"]), str(image), "--classes", "a", "a"], "duplicates index 0"),
        (["eval", str(trained["out"]), "--dataset", "nope"], "--dataset: no built dataset 'nope' at"),
        (["eval", str(trained["out"]), "--data-root", str(tmp_path)], f"no built dataset 'demo' at {tmp_path / 'demo'}"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "prompts.pt").write_bytes((trained["out"] / "prompts.pt").read_bytes())
    assert cli(["eval", str(tmp_path / "half")]) == 2
    assert "half: no config.yaml in this folder" in capsys.readouterr().err


def test_results_frame_holds_each_stages_latest_launch(tmp_path):
    from mlflow.entities import Metric

    from orchestrator.report import results_frame

    spec = spec_dict(datasets=("caltech101",), seeds=(1, 2))
    uri, exp, runs = write_store(tmp_path, spec, failed={("MaPLe", "caltech101", 2)})
    client = MlflowClient(uri)
    # An older final launch (its runs are not the latest) and a search launch with one trial.
    old = client.create_run(exp, tags={"hisf.stage": "final", "hisf.kind": "stage"}, start_time=1000).info.run_id
    client.create_run(exp, start_time=1001, tags={"mlflow.parentRunId": old, "hisf.stage": "final",
                                                  "hisf.trial_id": "old", "hisf.row": "CLIP", "hisf.seed": "1"})
    search = client.create_run(exp, tags={"hisf.stage": "search", "hisf.kind": "stage"}).info.run_id
    t = client.create_run(exp, tags={"mlflow.parentRunId": search, "hisf.stage": "search", "hisf.trial_id": "s0",
                                     "hisf.row": "HISF", "hisf.dataset": "caltech101", "hisf.seed": "1",
                                     "hisf.status": "pruned"}).info.run_id
    client.log_batch(t, metrics=[Metric("val_acc", 55.0, 0, 0)])
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    df = results_frame(path, tracking_uri=uri)
    assert list(df.columns[:9]) == ["stage", "row", "dataset", "seed", "status", "trial_id", "run_id", "launch",
                                    "start_time"]
    final = df[df.stage == "final"]
    assert len(final) == 6 and "old" not in set(df.trial_id)
    assert set(final.launch) != {old}
    for (row, _, dataset, seed), (run_id, metrics, status) in runs.items():
        rec = final.set_index("run_id").loc[run_id]
        assert (rec["row"], rec["dataset"], rec["seed"], rec["status"]) == (row, dataset, seed, status)
        for k, v in metrics.items():
            assert rec[f"metrics.{k}"] == v
        assert rec["params.seed"] == str(seed)
    s = df[df.stage == "search"].iloc[0]
    assert (s["trial_id"], s["status"], s["metrics.val_acc"], s["launch"]) == ("s0", "pruned", 55.0, search)
    every = results_frame(path, tracking_uri=uri, all_launches=True, stages=("final",))
    assert "old" in set(every.trial_id) and set(every.stage) == {"final"} and len(every) == 7
    assert isinstance(df, pd.DataFrame)
