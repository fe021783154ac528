"""`hisf-bench train`: the example trial config, --print-config, and bad input as one line (never a traceback)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
import yaml

from hisf.config import TrialConfig
from hisf.train import main
from tests.hisf.engine.helpers import tiny_trial_dict
from tests.support import ROOT

EXAMPLE = ROOT / "experiments" / "trial.yaml"


def test_example_trial_config_runs_on_the_demo_data(demo_root, tmp_path, capsys):
    cfg = TrialConfig.from_yaml(EXAMPLE)
    assert (cfg.method.name, cfg.data.dataset, cfg.protocol, cfg.backbone.name) == ("hisf", "demo", "base2new", "hisf-tiny")
    # The data root the example names is where its comment's `data build` writes; here the test's demo build.
    assert cfg.data.root == "hisf-bench/data" and "--out hisf-bench/data/demo" in EXAMPLE.read_text()
    out = tmp_path / "run"
    assert main([str(EXAMPLE), "--set", f"data.root={demo_root}", "--set", "train.epochs=1", "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "metrics.json").read_text())["final"]
    assert {"base_acc", "novel_acc", "hm", "val_acc"} <= set(printed)


def test_print_config_prints_every_section_with_its_defaults(tmp_path, capsys):
    assert main([str(EXAMPLE), "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert list(printed) == [f.name for f in dataclasses.fields(TrialConfig)]
    for section in ("backbone", "method", "data", "train"):
        assert list(printed[section]) == [f.name for f in dataclasses.fields(type(getattr(TrialConfig(), section)))]
    assert printed["method"]["depth"] == 2 and printed["train"]["momentum"] == 0.9
    assert TrialConfig.from_dict(printed) == TrialConfig.from_yaml(EXAMPLE)
    # What the nulls stand for: the method's n_ctx, the preset's lr and weight decay.
    assert "# null: method.n_ctx -> 2 (hisf's default); train.lr -> 0.0035 (preset paper); " \
           "train.weight_decay -> 0.0005 (preset paper)" in text
    # Without an output_dir the trial writes to runs/trial under the current folder.
    bare = tmp_path / "bare.yaml"
    bare.write_text("method: {name: coop}\n")
    assert main([str(bare), "--print-config", "--set", "train.lr=0.01"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output_dir"] == "runs/trial" and printed["method"]["depth"] == 9 and printed["train"]["lr"] == 0.01


def _train(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


class _Payload:
    """Pickles as a call of os.system: what a malicious file would run if it were unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_data_backbone_and_checkpoint_errors_are_one_line(demo_root, tmp_path, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(tiny_trial_dict(demo_root, tmp_path / "run", train={"epochs": 1})))
    # Data: a built dataset whose manifest is damaged.
    broken = tmp_path / "broken"
    shutil.copytree(demo_root / "demo", broken / "demo")
    (broken / "demo" / "manifest.parquet").write_bytes(b"PAR1 not really")
    rc, err = _train(capsys, config, "--set", f"data.root={broken}")
    assert rc == 2 and err.startswith("error: ") and "manifest.parquet" in err and len(err.strip().splitlines()) == 1
    # Backbone: an unknown architecture, a local weights file that is not a checkpoint, a pickled payload.
    rc, err = _train(capsys, config, "--set", "backbone.name=ViT-Nope")
    assert rc == 2 and "error: backbone.name: unknown model 'ViT-Nope'" in err
    junk = tmp_path / "weights.pt"
    junk.write_text("not weights")
    rc, err = _train(capsys, config, "--set", f"backbone.pretrained={junk}")
    assert rc == 2 and f"error: backbone.pretrained: {junk}: not a checkpoint we load: it is not a torch file" in err
    torch.save({"visual.proj": _Payload(tmp_path / "pwned")}, junk)
    rc, err = _train(capsys, config, "--set", f"backbone.pretrained={junk}")
    assert rc == 2 and "it holds a pickled Python object (posix.system)" in err
    assert "weights_only=False" not in err and not (tmp_path / "pwned").exists()
    # The trial's own checkpoint: junk, then a pickled payload; neither is read, both name the file and --fresh.
    state = tmp_path / "run" / "checkpoint" / "state.pt"
    state.parent.mkdir(parents=True)
    state.write_text("junk")
    rc, err = _train(capsys, config)
    assert rc == 2 and f"error: {state}: not a trial checkpoint we load: it is not a torch file" in err
    assert "rerun with --fresh" in err
    torch.save({"version": 2, "x": _Payload(tmp_path / "pwned")}, state)
    rc, err = _train(capsys, config)
    assert rc == 2 and "pickled Python object (posix.system)" in err and "weights_only=False" not in err
    assert not (tmp_path / "pwned").exists()
    # --fresh deletes the trial's checkpoint folder only, then trains.
    (tmp_path / "run" / "notes.txt").write_text("mine")
    rc, err = _train(capsys, config, "--fresh")
    assert rc == 0, err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert torch.load(state, weights_only=True)["epoch"] == 1
