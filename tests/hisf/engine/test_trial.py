"""Whole tiny trials on demo shards: base-to-novel end to end, determinism, other protocols, callbacks, bad input."""

from __future__ import annotations

import json
import time

import pytest
import torch

from hisf.config import ConfigError, replace_path
from hisf.engine import NonFiniteLossError, StopTrial, TrialCallback, run_trial, seed_everything
from hisf.engine.distributed import DistEnv
from hisf.engine.evaluation import accuracy, harmonic_mean
from hisf.engine.export import load_prompts
from tests.hisf.engine.helpers import free_port, tiny_trial, tiny_trial_dict, without_timing

CPU1 = DistEnv(0, 1, 0, torch.device("cpu"), owns_group=False)


class Recorder(TrialCallback):
    def __init__(self, stop_at_epoch: int | None = None):
        self.start, self.epochs, self.progress, self.end = None, [], [], None
        self.stop_at_epoch = stop_at_epoch

    def on_trial_start(self, data):
        self.start = data

    def on_epoch_end(self, epoch, metrics, checkpoint_dir):
        state = torch.load(f"{checkpoint_dir}/state.pt", weights_only=True)
        self.epochs.append((epoch, metrics, state["epoch"]))
        if epoch == self.stop_at_epoch:
            raise StopTrial("pruned")

    def on_progress(self, step, total, metrics):
        self.progress.append((step, total, metrics))

    def on_trial_end(self, metrics, artifacts):
        self.end = (metrics, artifacts)


def test_base2new_trial_end_to_end(demo_root, tmp_path):
    from data_shards import make_loader, open_dataset
    from hisf.model.backbone import load_backbone
    from hisf.model.methods import build_method

    cfg = tiny_trial(demo_root, tmp_path / "run")
    rec = Recorder()
    t0 = time.perf_counter()
    result = run_trial(cfg, [rec])
    assert time.perf_counter() - t0 < 60

    # What ran, for the run's environment record: the data, the precision after any fallback, eager or compiled.
    assert rec.start == {"image_mode": "fast", "dataset": "demo", "bad_images_left_out": 0, "precision": "fp32",
                         "compile": "eager", "device_name": "cpu", "group_size": 1}
    # 3 base classes x 4 shots = 12 samples, batch 4: 3 steps per epoch, 2 epochs.
    assert [(s, t) for s, t, _ in rec.progress] == [(i, 6) for i in range(1, 7)]
    assert [(e, state_epoch) for e, _, state_epoch in rec.epochs] == [(0, 1), (1, 2)]
    assert rec.epochs[0][1]["lr"] == pytest.approx(1e-5) and rec.epochs[1][1]["lr"] == pytest.approx(0.05)
    for key in ("train/loss", "train/loss_cls", "train/loss_le", "train/loss_sa", "val_acc", "skipped_steps"):
        assert key in rec.epochs[1][1]
    # eq. 12 with λ1 = λ2 = 1 holds for the epoch means too.
    m = rec.epochs[1][1]
    assert m["train/loss"] == pytest.approx(m["train/loss_cls"] + m["train/loss_le"] + m["train/loss_sa"], rel=1e-5)

    assert result["hm"] == pytest.approx(harmonic_mean(result["base_acc"], result["novel_acc"]))
    # 3 classes x 6 test images each side: accuracies are multiples of 100/18.
    for key in ("base_acc", "novel_acc"):
        assert (result[key] * 18 / 100) == pytest.approx(round(result[key] * 18 / 100), abs=1e-9)
    assert result["val_acc"] == rec.epochs[1][1]["val_acc"]
    assert result["skipped_steps"] == 0
    metrics, artifacts = rec.end
    assert metrics == result
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"] == result
    assert set(artifacts) == {"prompts", "config", "metrics", "eval"}
    eval_dir = tmp_path / "run" / "eval"
    assert artifacts["eval"] == str(eval_dir)
    assert sorted(p.name for p in eval_dir.iterdir()) == ["base.json", "base.png", "novel.json", "novel.png",
                                                          "val.json", "val.png"]

    # The exported prompts alone reproduce the base and novel accuracies on a freshly built model.
    ds = open_dataset(demo_root / "demo")
    seed_everything(cfg.seed)  # the tiny backbone has random weights drawn from the trial seed
    backbone = load_backbone(cfg.backbone)
    model = build_method(cfg.method, backbone, ds.select("train", 4, 1, "base").classnames, template=ds.template)
    init = model.trainable_state_dict()
    payload = load_prompts(artifacts["prompts"], model, cfg)
    assert result["trainable_params"] == sum(v.numel() for v in payload["trainable"].values())
    assert any(not torch.equal(init[k], v) for k, v in payload["trainable"].items())
    for classes, key in (("base", "base_acc"), ("novel", "novel_acc")):
        test = ds.select("test", None, 1, classes)
        model.set_classnames(test.classnames, template=ds.template)
        loader = make_loader(test, train=False, batch_size=16, image_size=backbone.image_size, mean=backbone.mean,
                             std=backbone.std)
        assert accuracy(model, loader, CPU1) == [pytest.approx(result[key], abs=1e-9)]  # its one member
        # Per-class accuracy and the confusion matrix equal a hand count of the model's own logits.
        labels, preds = [], []
        with torch.no_grad():
            for images, y in loader:
                preds += model.eval()(images, shared=True)[0].argmax(-1).tolist()
                labels += y.tolist()
        rec = json.loads((eval_dir / f"{key.split('_')[0]}.json").read_text())
        c = len(test.classnames)
        matrix = [[sum(1 for t, p in zip(labels, preds) if (t, p) == (i, j)) for j in range(c)] for i in range(c)]
        assert rec["classnames"] == list(test.classnames) and rec["confusion"] == matrix
        assert rec["support"] == [labels.count(i) for i in range(c)] == [6] * c
        assert rec["per_class_accuracy"] == [pytest.approx(100 * matrix[i][i] / 6) for i in range(c)]
        assert rec["accuracy"] == result[key]  # the trace over the total: the run's metric exactly
        assert rec["correct"] == sum(t == p for t, p in zip(labels, preds)) and rec["total"] == len(labels)
    val = json.loads((eval_dir / "val.json").read_text())
    assert val["metric"] == "val_acc" and val["accuracy"] == result["val_acc"]
    assert val["classnames"] == list(ds.select("train", 4, 1, "base").classnames) and val["total"] == 3 * 4


def test_same_config_twice_gives_identical_metrics(demo_root, tmp_path):
    a = run_trial(tiny_trial(demo_root, tmp_path / "a", train={"epochs": 1}))
    b = run_trial(tiny_trial(demo_root, tmp_path / "b", train={"epochs": 1}))
    assert without_timing(a) == without_timing(b)
    pa = torch.load(tmp_path / "a" / "prompts.pt", weights_only=True)["trainable"]
    pb = torch.load(tmp_path / "b" / "prompts.pt", weights_only=True)["trainable"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = run_trial(tiny_trial(demo_root, tmp_path / "c", seed=2, train={"epochs": 1}))
    assert c["train/loss"] != a["train/loss"]


def test_cross_dataset_and_zeroshot(demo_root, tmp_path):
    # Target = the source itself: its target accuracy must equal the source test accuracy.
    cross = run_trial(tiny_trial(demo_root, tmp_path / "x", protocol="cross_dataset", method={"name": "maple"},
                                 data={"targets": ["demo"]}, train={"epochs": 1}))
    assert cross["target/demo"] == cross["acc"]
    assert {"acc", "val_acc", "target/demo", "trainable_params"} <= set(cross)
    dg = run_trial(tiny_trial(demo_root, tmp_path / "d", protocol="domain_generalization", method={"name": "maple"},
                              data={"targets": ["demo"]}, train={"epochs": 1}))
    assert without_timing(dg) == without_timing(cross)
    zs = run_trial(tiny_trial(demo_root, tmp_path / "z", method={"name": "zeroshot"}))
    assert zs["trainable_params"] == 0 and zs["train_seconds"] == 0
    assert zs["hm"] == pytest.approx(harmonic_mean(zs["base_acc"], zs["novel_acc"]))


def test_stop_trial_from_a_callback_stops_after_that_epoch(demo_root, tmp_path):
    rec = Recorder(stop_at_epoch=0)
    result = run_trial(tiny_trial(demo_root, tmp_path / "s", train={"epochs": 3}), [rec])
    assert result["stopped"] == 1.0 and result["epoch"] == 0
    assert [e for e, _, _ in rec.epochs] == [0] and rec.end is None
    assert not (tmp_path / "s" / "metrics.json").exists()
    # The trial resumes from the pruned epoch's checkpoint when run again.
    rec2 = Recorder()
    run_trial(tiny_trial(demo_root, tmp_path / "s", train={"epochs": 3}), [rec2])
    assert [e for e, _, _ in rec2.epochs] == [1, 2]


def test_nan_guard_stops_a_diverging_trial(demo_root, tmp_path):
    # lr 1e30 blows the prompts up after the warm-up epoch; the guard must stop the trial, not train on.
    cfg = tiny_trial(demo_root, tmp_path / "nan", train={"epochs": 3, "warmup_epochs": 0, "lr": 1e30,
                                                          "max_nonfinite_steps": 2})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss for 2 steps in a row"):
        run_trial(cfg)


def test_bad_input_fails_before_training(demo_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.dataset: no built dataset 'caltech101' at .*caltech101"):
        run_trial(tiny_trial(demo_root, tmp_path / "a", data={"dataset": "caltech101"}))
    with pytest.raises(ConfigError, match=r"data.targets\[0\]: no built dataset 'dtd'"):
        run_trial(tiny_trial(demo_root, tmp_path / "a", protocol="cross_dataset", data={"targets": ["dtd"]}))
    with pytest.raises(ConfigError, match=r"train.batch_size: 16 per rank x 1 rank\(s\) = 16 is more than the 12"):
        run_trial(tiny_trial(demo_root, tmp_path / "a", train={"batch_size": 16}))
    with pytest.raises(ConfigError, match=r"train.precision: unknown value 'fp8'"):
        tiny_trial(demo_root, tmp_path / "a", train={"precision": "fp8"})
    with pytest.raises(ConfigError, match=r"train.epoch: unknown key"):
        tiny_trial(demo_root, tmp_path / "a", train={"epoch": 3})
    assert not (tmp_path / "a").exists()
    # A checkpoint from another trial config in the same output_dir is refused, not silently reused.
    cfg = tiny_trial(demo_root, tmp_path / "b", train={"epochs": 1})
    run_trial(cfg)
    with pytest.raises(ConfigError, match=r"method.lambda_le is 1.0 there, 0.5 now"):
        run_trial(replace_path(cfg, "method.lambda_le", 0.5))


def test_cli_runs_a_trial_and_reports_config_errors(demo_root, tmp_path, capsys):
    import yaml

    from hisf.train import main

    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(tiny_trial_dict(demo_root, tmp_path / "cli", method={"name": "zeroshot"})))
    assert main([str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "cli" / "metrics.json").read_text())["final"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_trial_dict(demo_root, tmp_path), "seeds": 3}))
    assert main([str(bad)]) == 2
    assert "seeds: unknown key" in capsys.readouterr().err
    assert main([str(path), "--set", "method.depth=0"]) == 2
    assert "method.depth: expected an integer >= 1, got 0" in capsys.readouterr().err
    # `hisf-bench train` forwards to the same main; --no-resume reruns, --set overrides.
    from orchestrator.cli import main as bench_main

    assert bench_main(["train", str(path), "--no-resume", "--set", "seed=2", "--output-dir", str(tmp_path / "cli2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["trainable_params"] == 0 and again["hm"] == pytest.approx(harmonic_mean(again["base_acc"], again["novel_acc"]))
    assert yaml.safe_load((tmp_path / "cli2" / "config.yaml").read_text())["seed"] == 2


def test_a_process_group_made_by_the_caller_is_used_and_left_alone(demo_root, tmp_path):
    """Ray Train's TorchTrainer sets up the group before the trial function runs; the engine must join it."""
    import torch.distributed as dist


    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        alone = run_trial(tiny_trial(demo_root, tmp_path / "g", train={"epochs": 1}))
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
    plain = run_trial(tiny_trial(demo_root, tmp_path / "p", train={"epochs": 1}))
    assert without_timing(alone) == without_timing(plain)


def test_bf16_trial_and_fp16_fallback_on_cpu(demo_root, tmp_path):
    fp32 = run_trial(tiny_trial(demo_root, tmp_path / "32", train={"epochs": 1}))
    bf16 = run_trial(tiny_trial(demo_root, tmp_path / "bf", train={"epochs": 1, "precision": "bf16"}))
    rec = Recorder()
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        fp16 = run_trial(tiny_trial(demo_root, tmp_path / "16", train={"epochs": 1, "precision": "fp16"}), [rec])
    assert rec.start["precision"] == "bf16"  # what runs, not what was asked for
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=5e-2)
    assert bf16["train/loss"] != fp32["train/loss"]
    assert without_timing(fp16) == without_timing(bf16)
