"""TrialCallback.all_ranks under 2 real gloo ranks (torchrun): such a callback runs on every rank with the same
all-reduced metrics; a default callback runs on rank 0 only."""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.hisf.engine.helpers import WORKTREE, child_env, tiny_trial_dict, torchrun

RECORDER = """
import json, os, sys
from hisf.config import TrialConfig
from hisf.engine import TrialCallback, run_trial

class Every(TrialCallback):
    all_ranks = True

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, metrics, checkpoint_dir):
        self.seen.append(["epoch", epoch, metrics["train/loss"], metrics["val_acc"], checkpoint_dir])

    def on_trial_end(self, metrics, artifacts):
        self.seen.append(["end", metrics["base_acc"], sorted(artifacts)])

class MainOnly(Every):
    all_ranks = False

cbs = {"every": Every(), "main": MainOnly()}
run_trial(TrialConfig.from_yaml(sys.argv[1]), list(cbs.values()))
with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({k: cb.seen for k, cb in cbs.items()}, f)
"""


def test_all_ranks_callback_runs_on_every_rank_default_on_rank0(demo_root, tmp_path):
    out = tmp_path / "trial"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(tiny_trial_dict(demo_root, out, train={"batch_size": 2, "log_every": 0})))
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    proc = subprocess.run(torchrun(2, script, cfg, tmp_path), env=child_env(), cwd=WORKTREE, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    history = json.loads((out / "metrics.json").read_text())

    ckpt_dir = str(out / "checkpoint")
    expected = [["epoch", e["epoch"], e["train/loss"], e["val_acc"], ckpt_dir] for e in history["epochs"]]
    assert len(expected) == 2
    # Both ranks saw the same epochs with the same (all-reduced) numbers as the engine's metrics.json.
    assert r0["every"][:2] == expected and r1["every"][:2] == expected
    assert r0["every"][2] == ["end", history["final"]["base_acc"], ["config", "eval", "metrics", "prompts"]]
    assert r1["every"][2] == ["end", history["final"]["base_acc"], []]  # artifacts live on rank 0
    # The default stays rank 0 only.
    assert r0["main"] == r0["every"] and r1["main"] == []
